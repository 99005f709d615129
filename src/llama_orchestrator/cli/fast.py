"""The CLI's fast path: `llama-orch --help` and `llama-orch ps` answered without typer, click, rich, pydantic or
httpx, which cost 150 to 400 ms of imports before the first line is written (``bench/cli_startup.py``).

``run(argv)`` answers what it understands exactly and returns the exit code; for anything else (another command,
an unknown flag, an error to report, a case where only rich knows the rendering) it returns None and
``cli.app.main`` runs the typer app, which then says it with its own words and exit code. So this module never
decides anything the typer commands do not: it is a shortcut to the same answer.

* ``--help``: typer's own text, recorded the first time it is printed (``recording_help``) and replayed while
  nothing it depends on changed: the key holds the stamps of every ``cli/*.py``, of typer, click and rich, the
  program name, the terminal's width and kind and the environment variables rich and typer read.
* ``ps``: the records from this home's daemon API (``adapters.http_get``, no httpx; the control key
  from ``adapters.config_cache``, no pydantic while ``orchestrator.json`` is unchanged), or from ``--host``'s, or
  from the home itself (``LocalInstances``, which imports the config models, or its snapshot while nothing it
  reads changed: ``adapters.ps_snapshot``); rendered by ``cli.render`` (``ps_text``: the table rich draws, without
  rich).

``LLAMA_ORCH_NO_FAST=1`` turns it off (every command through typer).
"""

from __future__ import annotations

import json
import os
import sys

TYPE_CHECKING = False  # typing and pathlib stay unimported (about 10 ms together): the fast path counts them
if TYPE_CHECKING:
    from typing import Any

NO_FAST_ENV = "LLAMA_ORCH_NO_FAST"
CACHE_ENV = "LLAMA_ORCH_CACHE_DIR"
HELP_FLAGS = ("--help", "-h")
GLOBAL_OPTIONS = {"--home": "home", "--host": "host", "--api-key": "api_key"}
# What rich and typer read from the environment when they format help.
HELP_ENV = (
    "COLUMNS",
    "LINES",
    "NO_COLOR",
    "FORCE_COLOR",
    "TTY_COMPATIBLE",
    "TTY_INTERACTIVE",
    "TERM",
    "COLORTERM",
    "JUPYTER_COLUMNS",
    "PYTHONIOENCODING",
    "LANG",
    "LC_ALL",
)
HELP_ENTRIES_KEPT = 8  # one per terminal width or kind recently used
PROXY_ENV = ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def run(argv: list[str]) -> int | None:
    """Answer ``argv`` (the arguments after the program name) when it is `--help` or `ps`; None: not here."""
    if os.environ.get(NO_FAST_ENV):
        return None
    parsed = split_globals(argv)
    if parsed is None:
        return None
    options, rest = parsed
    if len(rest) == 1 and rest[0] in HELP_FLAGS:
        text = help_cache().get(help_key())
        if text is None:
            return None
        sys.stdout.write(text)
        sys.stdout.flush()
        return 0
    if rest and rest[0] == "ps":
        return _ps(options, rest[1:])
    return None


def split_globals(argv: list[str]) -> tuple[dict[str, str], list[str]] | None:
    """The root options (``--home``, ``--host``, ``--api-key``, as ``--opt VALUE`` or ``--opt=VALUE``) and what
    follows them; None when something there is not understood (typer then reports it)."""
    options: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("--") and argv[i] not in HELP_FLAGS:
        name, eq, value = argv[i].partition("=")
        if name not in GLOBAL_OPTIONS:
            return None
        if not eq:
            if i + 1 >= len(argv):
                return None
            i += 1
            value = argv[i]
        if not value:
            return None  # `--home ""`: typer's Path conversion decides
        options[GLOBAL_OPTIONS[name]] = value
        i += 1
    return options, argv[i:]


# -- --help ----------------------------------------------------------------------------------------------------


def cache_dir() -> str:
    """``$LLAMA_ORCH_CACHE_DIR``, else the platform's user cache folder (without importing platformdirs)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return explicit
    home = os.path.expanduser("~")
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(home, "AppData", "Local")
        return os.path.join(base, "llama-orchestrator", "Cache")
    if sys.platform == "darwin":
        return os.path.join(home, "Library", "Caches", "llama-orchestrator")
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache"), "llama-orchestrator")


def help_cache() -> HelpCache:
    return HelpCache(os.path.join(cache_dir(), "help.json"))


def _stamp(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size, st.st_ino]


def _package_init(name: str) -> str | None:
    """Where ``import name`` would find its package's ``__init__.py`` (a reinstall changes its stamp)."""
    for entry in sys.path:
        candidate = os.path.join(entry or ".", name, "__init__.py")
        if os.path.isfile(candidate):
            return candidate
    return None


def help_sources() -> list[str]:
    """The files typer's help text is made from: our commands, and the packages that format them."""
    cli = os.path.dirname(os.path.abspath(__file__))
    sources = [os.path.join(cli, n) for n in sorted(os.listdir(cli)) if n.endswith(".py")]
    sources.append(os.path.join(os.path.dirname(cli), "__init__.py"))
    return sources + [p for p in (_package_init(n) for n in ("typer", "click", "rich")) if p is not None]


def help_key(sources: list[str] | None = None) -> str:
    """Everything typer's help output depends on, as one string."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    terminal = []
    for fd in (0, 1, 2):
        try:
            terminal.append([os.isatty(fd), *os.get_terminal_size(fd)])
        except (OSError, ValueError):
            terminal.append([False])
    parts: dict[str, Any] = {
        "python": sys.version,
        "platform": sys.platform,
        # click names the program after argv[0], or `python -m PACKAGE` when run as a module.
        "prog": [os.path.basename(sys.argv[0]) if sys.argv else "", getattr(spec, "name", None)],
        "sources": [[p, _stamp(p)] for p in (help_sources() if sources is None else sources)],
        "terminal": terminal,
        "stdout_tty": _isatty(sys.stdout),
        "env": {k: v for k, v in sorted(os.environ.items()) if k in HELP_ENV or k.lstrip("_").startswith("TYPER")},
    }
    return json.dumps(parts, sort_keys=True)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class HelpCache:
    """Help texts by key in one JSON file; unreadable or unwritable is the same as empty."""

    def __init__(self, file: str) -> None:
        self.file = file

    def _entries(self) -> dict[str, str]:
        try:
            with open(self.file, encoding="utf-8") as cached:
                data = json.load(cached)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> str | None:
        text = self._entries().get(key)
        return text if isinstance(text, str) else None

    def put(self, key: str, text: str) -> None:
        entries = [(k, v) for k, v in self._entries().items() if k != key]
        kept = dict(entries[-(HELP_ENTRIES_KEPT - 1) :])
        kept[key] = text
        tmp = f"{self.file}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.file) or ".", exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as out:
                out.write(json.dumps(kept))
            os.replace(tmp, self.file)
        except OSError:
            try:  # noqa: SIM105 - contextlib costs 4 ms of imports on the fast path
                os.unlink(tmp)
            except OSError:
                pass


class _Tee:
    """Stands in for stdout while typer prints its help: writes go through, and are kept."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        written = self.stream.write(text)  # first: click probes with bytes, which a text stream refuses
        self.parts.append(text)
        return written

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, flush...: the real stream's
        return getattr(self.stream, name)


def is_help_request(argv: list[str]) -> bool:
    parsed = split_globals(argv)
    return parsed is not None and len(parsed[1]) == 1 and parsed[1][0] in HELP_FLAGS


class recording_help:
    """Around the typer app: when ``argv`` asks for the root help, keep what it prints and, when it exits 0, store
    it for ``run`` under ``help_key()`` (taken before, so a change meanwhile is not recorded as current)."""

    def __init__(self, argv: list[str]) -> None:
        self.active = not os.environ.get(NO_FAST_ENV) and is_help_request(argv)
        self.key = help_key() if self.active else ""
        self.tee: _Tee | None = None

    def __enter__(self) -> recording_help:
        if self.active:
            self.tee = _Tee(sys.stdout)
            sys.stdout = self.tee
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self.tee is None:
            return
        sys.stdout = self.tee.stream
        ok = kind is None or (isinstance(exc, SystemExit) and exc.code in (None, 0))
        if ok and self.tee.parts:
            help_cache().put(self.key, "".join(self.tee.parts))


# -- ps --------------------------------------------------------------------------------------------------------


class PsFlags:
    __slots__ = ("all", "filters", "fmt", "json", "quiet")

    def __init__(self) -> None:
        self.all = False
        self.json = False
        self.quiet = False
        self.filters: list[str] = []
        self.fmt: str | None = None


def parse_ps(args: list[str]) -> PsFlags | None:
    """The flags of `ps` as click parses them (``-aq``, ``-fVALUE``, ``--filter=V``, the last ``--format`` wins);
    None for anything else (``--help``, a stray argument, a missing value): typer answers those."""
    flags = PsFlags()
    it = iter(args)
    for arg in it:
        if arg.startswith("--"):
            name, eq, given = arg.partition("=")
            if name in ("--all", "--json", "--quiet") and not eq:
                setattr(flags, name[2:], True)
                continue
            if name not in ("--filter", "--format"):
                return None
            value = given if eq else next(it, None)
            if value is None:
                return None
            if name == "--filter":
                flags.filters.append(value)
            else:
                flags.fmt = value
            continue
        if not arg.startswith("-") or arg == "-":
            return None
        cluster = arg[1:]
        for j, letter in enumerate(cluster):
            if letter == "a":
                flags.all = True
            elif letter == "q":
                flags.quiet = True
            elif letter == "f":
                attached = cluster[j + 1 :] or next(it, None)
                if attached is None:
                    return None
                flags.filters.append(attached)
                break
            else:
                return None
    return flags


def _ps(options: dict[str, str], args: list[str]) -> int | None:
    flags = parse_ps(args)
    if flags is None:
        return None
    from llama_orchestrator.cli import ps_query, render

    try:
        wanted = ps_query.parse_filters(flags.filters)
        records = _records(options, include_orphans=flags.all)
        if records is None:
            return None
        records = ps_query.apply_filters(records, wanted)
        if flags.quiet:
            out = "".join(r["name"] + "\n" for r in records)
        elif flags.fmt is not None:
            out = ps_query.render_format(render.json_ready(records), flags.fmt, render.ps_cell)
        elif flags.json:
            out = json.dumps(render.json_ready(records), indent=2, default=str) + "\n"
        elif not records:
            out = "no instances yet: create one with `llama-orch init NAME --model FILE.gguf`\n"
        else:
            target = render.text_target()
            text = render.ps_text(records, styled=target[0], width=target[1]) if target else None
            if text is None:
                _print_with_rich(records)
                return 0
            out = text
    except Exception as exc:
        # domain.errors imported only now: it costs `dataclasses` and `inspect`, about 8 ms, on every `ps`.
        from llama_orchestrator.domain.errors import OrchestratorError

        if isinstance(exc, OrchestratorError):
            return None  # a refusal is typer's to report, in its words and with its exit code
        raise
    sys.stdout.write(out)
    sys.stdout.flush()
    return 0


def _print_with_rich(records: list[dict[str, Any]]) -> None:
    from llama_orchestrator.cli import render

    render.console().print(render.ps_table(records))
    for line in render.ps_legend(records):
        render.console().print(line, markup=False, style="dim")


def _records(options: dict[str, str], *, include_orphans: bool) -> list[dict[str, Any]] | None:
    """What ``commands.instances().ps()`` answers, by the same choice of port; None when typer's path must answer
    (it then also reports any refusal, or warns that the daemon does not answer and acts on the home)."""
    host = options.get("host") or os.environ.get("LLAMA_ORCH_HOST") or None
    key = options.get("api_key") or os.environ.get("LLAMA_ORCH_API_KEY") or None
    if host:
        return _api_ps(host, key, include_orphans)
    root = home_root(options.get("home"))
    state = os.path.join(root, "state")
    from llama_orchestrator.adapters import daemon_pidfile

    daemon = daemon_pidfile.read(state)
    if daemon is not None:
        alive = daemon_pidfile.alive(daemon)
        if alive is None:
            return None  # not Linux: daemon_control.daemon_info tells, with psutil
        if alive and daemon.api_url:
            from llama_orchestrator.adapters.config_cache import control_key

            key = key or control_key(os.path.join(root, "orchestrator.json"), state)
            return _api_ps(daemon.api_url, key, include_orphans)
    return _local_ps(root, include_orphans)


def _local_ps(root: str, include_orphans: bool) -> list[dict[str, Any]]:
    """``LocalInstances.ps``, or its snapshot when nothing it reads changed (``adapters.ps_snapshot``)."""
    from llama_orchestrator.adapters import ps_snapshot

    at = ps_snapshot.key(root, include_orphans)
    kept = ps_snapshot.load(root, at)
    if kept is not None:
        return kept
    from pathlib import Path

    from llama_orchestrator.adapters.home import Home
    from llama_orchestrator.services.instances import InstanceService
    from llama_orchestrator.services.instances_port import LocalInstances

    service = InstanceService(Home(Path(root)).secure())
    records = LocalInstances(service).ps(include_orphans=include_orphans)
    if at is None or not ps_snapshot.keepable(records):
        return records
    processes = []
    for record in records:
        if record["status"] == "running":
            row = service.store.get(record["name"])
            if row is None or row.pid is None:
                return records
            processes.append((row.pid, row.create_time or 0.0))
    if ps_snapshot.key(root, include_orphans) == at:  # nothing wrote meanwhile (this ps included)
        ps_snapshot.save(root, at, records, processes)
    return records


def _api_ps(url: str, key: str | None, include_orphans: bool) -> list[dict[str, Any]] | None:
    """``GET /api/instances`` as ``RemoteInstances.ps`` asks it; None for anything but a 200 with a JSON list."""
    from llama_orchestrator.adapters import http_get

    if any(os.environ.get(k) for k in PROXY_ENV):
        return None  # httpx would go through the proxy
    headers = {"Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    params = {"all": "true" if include_orphans else "false"}
    try:
        status, _, body = http_get.get(http_get.normalize_url(url), "/api/instances", params, headers)
        records = json.loads(body) if status == 200 else None
    except (OSError, ValueError):  # unreachable, too slow, not plain http, not JSON
        return None
    return records if isinstance(records, list) and all(isinstance(r, dict) for r in records) else None


def home_root(explicit: str | None) -> str:
    """``Home.resolve``'s choice (``--home``, ``$LLAMA_ORCH_HOME``, the user data folder) without importing
    ``adapters.home`` (it imports the config models)."""
    chosen = explicit or os.environ.get("LLAMA_ORCH_HOME")
    if chosen:
        return os.path.abspath(os.path.expanduser(chosen))
    import platformdirs

    return os.path.abspath(os.path.expanduser(platformdirs.user_data_dir("llama-orchestrator", appauthor=False)))
