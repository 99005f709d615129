"""`llama-orch`: the command line. Commands parse, call a service, render; nothing else.

Imports of anything heavier than typer happen inside the commands, so `--help` and `ps` start fast.
Exit codes (one place: ``main``): 0 ok, 1 failed, 2 usage or invalid config, 3 not found.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from llama_orchestrator.services.instances import InstanceService

app = typer.Typer(
    name="llama-orch",
    help="Docker-like control plane for llama.cpp llama-server instances.\n\n"
    "Example: llama-orch init qwen --model ./qwen.gguf && llama-orch up qwen -d --wait && llama-orch ps",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Validate instance configs and print their JSON Schema.", no_args_is_help=True)
app.add_typer(config_app, name="config")
daemon_app = typer.Typer(help="The supervisor: health checks and restarts in the background.", no_args_is_help=True)
app.add_typer(daemon_app, name="daemon")
NO_DAEMON_ENV = "LLAMA_ORCH_NO_DAEMON"

HomeOption = Annotated[
    Optional[Path],
    typer.Option("--home", envvar="LLAMA_ORCH_HOME", help="Home folder (default: $LLAMA_ORCH_HOME, else the "
                 "platform's user data folder).", show_default=False),
]
_state: dict[str, object] = {}


@app.callback()
def _root(home: HomeOption = None) -> None:
    _state["home"] = home


def service() -> InstanceService:
    from llama_orchestrator.adapters.home import Home
    from llama_orchestrator.services.instances import InstanceService

    if "service" not in _state:
        _state["service"] = InstanceService(Home.resolve(_state.get("home")))  # type: ignore[arg-type]
    return _state["service"]  # type: ignore[return-value]


def say(message: str) -> None:
    from llama_orchestrator.cli.render import console

    console().print(message)


def warn(message: str) -> None:
    from llama_orchestrator.cli.render import console

    console(stderr=True).print(f"[yellow]warning:[/] {message}")


def resolve_names(names: list[str], all_: bool, *, autostart_only: bool = False) -> list[str]:
    from llama_orchestrator.domain.errors import UsageError

    svc = service()
    if all_:
        if names:
            raise UsageError("give instance names or --all, not both")
        chosen = svc.names()
        if autostart_only:
            chosen = [n for n in chosen if _autostart(svc, n)]
        return chosen
    if not names:
        raise UsageError("name at least one instance, or use --all")
    for name in names:
        svc.home.checked_name(name)
    return names


def _autostart(svc: InstanceService, name: str) -> bool:
    from llama_orchestrator.domain.errors import ConfigError

    try:
        return svc.load(name).autostart
    except ConfigError:
        return True  # `up --all` then reports the broken config instead of silently skipping it


# -- init ------------------------------------------------------------------------------------------------------


@app.command()
def init(
    name: Annotated[str, typer.Argument(help="Instance name: lowercase letters, digits, dashes.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="GGUF model file.")],
    port: Annotated[Optional[int], typer.Option(help="Port (default: the first free one from 8001).")] = None,
    host: Annotated[str, typer.Option(help="Listen address.")] = "127.0.0.1",
    context_size: Annotated[int, typer.Option("--context-size", "-c", help="Context size in tokens.")] = 4096,
    gpu_layers: Annotated[int, typer.Option("--gpu-layers", help="Layers on the GPU (0 = CPU, -1 = all).")] = 0,
    backend: Annotated[str, typer.Option(help="auto, cpu, vulkan, cuda, metal or rocm.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: llama-server's choice).")] = None,
    parallel: Annotated[int, typer.Option(help="Concurrent request slots.")] = 1,
    binary: Annotated[Optional[str], typer.Option(help="llama-server: a registered name or a path.")] = None,
    restart: Annotated[str, typer.Option(help="always, on-failure, unless-stopped or never.")] = "on-failure",
    autostart: Annotated[bool, typer.Option(help="Start with `up --all` and when the daemon starts.")] = False,
    arg: Annotated[Optional[list[str]], typer.Option("--arg", help="Extra llama-server argument (repeat).")] = None,
) -> None:
    """Create an instance config in the home (refuses to overwrite).

    Example: llama-orch init qwen --model ~/models/qwen2.5-0.5b-q4_k_m.gguf --context-size 8192
    """
    from pydantic import ValidationError

    from llama_orchestrator.adapters.config_files import problems_from
    from llama_orchestrator.domain.config import InstanceConfig
    from llama_orchestrator.domain.errors import ConfigError, NotFoundError

    svc = service()
    svc.home.checked_name(name)
    model_path = model.expanduser().absolute()
    if not model_path.is_file():
        raise NotFoundError(f"model file {str(model_path)!r} not found")
    document = {
        "name": name,
        "model": {"path": str(model_path), "context_size": context_size, "threads": threads},
        "server": {"host": host, "port": port or 8001, "parallel": parallel},
        "gpu": {"backend": backend, "layers": gpu_layers},
        "restart": {"policy": restart},
        "autostart": autostart,
        "binary": binary,
        "args": arg or [],
    }
    try:
        config = InstanceConfig.from_document(document)
    except ValidationError as exc:
        raise ConfigError("command-line options", problems_from(exc, document)) from None
    config = svc.create(config, auto_port=port is None)
    say(f"created [bold]{name}[/] on port {config.server.port}: {svc.home.config_path(name)}")
    say(f"start it with: llama-orch up {name} -d --wait")


# -- up / down / restart ---------------------------------------------------------------------------------------


@app.command()
def up(
    names: Annotated[Optional[list[str]], typer.Argument(help="Instances to start.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every instance with autostart (all when none has it).")] = False,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Start in the background and return.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Return only when healthy (fails if it exits).")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits for healthy.")] = 120.0,
    no_daemon: Annotated[bool, typer.Option("--no-daemon", envvar=NO_DAEMON_ENV,
                                            help="With -d: don't start the daemon even if a restart policy needs it.")]
    = False,
) -> None:
    """Start instances. Without -d the logs stream here and Ctrl-C stops them (as `docker compose up`).

    With -d, the daemon is started too when an instance's restart policy needs supervision.

    Example: llama-orch up qwen -d --wait
    """
    from llama_orchestrator.domain.errors import OrchestratorError, StartError

    svc = service()
    chosen = resolve_names(names or [], all_, autostart_only=True)
    if all_ and not chosen:
        chosen = svc.names()
    failures: list[str] = []
    started: list[str] = []
    for name in chosen:
        try:
            outcome = svc.start(name)
        except OrchestratorError as exc:
            if len(chosen) == 1:
                raise
            failures.append(str(exc))
            continue
        if outcome.already_running:
            say(f"{name} is already {outcome.row.status} (pid {outcome.row.pid})")
        else:
            say(f"{name} starting (pid {outcome.row.pid}, port {outcome.row.port})")
            started.append(name)
    for name in list(started if detach or wait else []):
        try:
            if wait:
                svc.wait_healthy(name, timeout)
                say(f"{name} [green]healthy[/]")
            else:
                svc.wait_early_exit(name)
        except StartError as exc:
            failures.append(str(exc))
    if detach and started and not no_daemon:
        _ensure_daemon_for(svc, started)
    if failures:
        raise StartError("\n".join(failures))
    if not detach and chosen:
        _attach(svc, chosen)


def _ensure_daemon_for(svc: InstanceService, names: list[str]) -> None:
    from llama_orchestrator.services import daemon_control

    if daemon_control.daemon_info(svc.home) is not None:
        return
    needing = [n for n in names if svc.load(n).restart.policy != "never"]
    if needing:
        info = daemon_control.start_daemon(svc.home)
        say(f"daemon started (pid {info.pid}) to supervise {', '.join(needing)}")


def _attach(svc: InstanceService, names: list[str]) -> None:
    """Stream the instances' logs until they all exit or Ctrl-C, which stops them."""
    from llama_orchestrator.adapters.logfiles import follow
    from llama_orchestrator.domain.states import ACTIVE

    paths = {svc.home.log_path(n, s): n for n in names for s in ("stdout", "stderr")}
    width = max(len(n) for n in names)

    def all_exited() -> bool:
        return all(svc.refresh(n).status not in ACTIVE for n in names)

    try:
        for path, line in follow(list(paths), stop=all_exited, from_end=False):
            sys.stdout.write(f"{paths[path]:<{width}} | {line}\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stderr.write("stopping...\n")
        for name in names:
            svc.stop(name)
        return
    raise typer.Exit(1)


@app.command()
def down(
    names: Annotated[Optional[list[str]], typer.Argument(help="Instances to stop.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Stop every instance.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait after SIGTERM before killing the tree.")] = 10.0,
) -> None:
    """Stop instances: SIGTERM (CTRL_BREAK on Windows), then kill the whole process tree after --timeout.

    Example: llama-orch down qwen
    """
    svc = service()
    for name in resolve_names(names or [], all_):
        before = svc.refresh(name)
        svc.stop(name, timeout)
        say(f"{name} stopped" if before.status in ("starting", "running", "stopping") else f"{name} was not running")


@app.command()
def restart(
    names: Annotated[list[str], typer.Argument(help="Instances to restart.")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a graceful stop.")] = 10.0,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until healthy again.")] = True,
    wait_timeout: Annotated[float, typer.Option(help="Seconds to wait for healthy.")] = 120.0,
) -> None:
    """Stop, then start again (detached).

    Example: llama-orch restart qwen
    """
    svc = service()
    for name in resolve_names(names, False):
        svc.load(name)  # a broken config is reported before the running instance is stopped
        svc.stop(name, timeout)
        outcome = svc.start(name)
        say(f"{name} restarted (pid {outcome.row.pid})")
        if wait:
            svc.wait_healthy(name, wait_timeout)
            say(f"{name} [green]healthy[/]")


# -- ps / logs / health / describe / rm ------------------------------------------------------------------------


@app.command()
def ps(
    all_: Annotated[bool, typer.Option("--all", "-a", help="Also state left by instances whose config is gone.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List instances: NAME STATUS HEALTH PID PORT BACKEND MODEL UPTIME RESTARTS.

    Example: llama-orch ps --json
    """
    import time

    from llama_orchestrator.cli import render

    svc = service()
    views = svc.views(include_orphans=all_)
    _probe_starting(svc, views)
    now = time.time()
    if json_:
        render.print_json([render.ps_record(v, now) for v in views])
        return
    if not views:
        say("no instances yet: create one with `llama-orch init NAME --model FILE.gguf`")
        return
    render.console().print(render.ps_table(views, now))


def _probe_starting(svc: InstanceService, views: list) -> None:
    """Without a daemon nobody moves `starting` to `running`: one quick probe of those instances does."""
    starting = [v for v in views if v.row.status == "starting" and v.config is not None]
    if not starting:
        return
    from concurrent.futures import ThreadPoolExecutor

    from llama_orchestrator.services.health import check_once, default_probe

    def quick(url: str, path: str, timeout: float):
        return default_probe(url, path, min(timeout, 0.5))

    with ThreadPoolExecutor(max_workers=min(8, len(starting))) as pool:
        list(pool.map(lambda v: check_once(svc, v.name, v.config, v.row, probe=quick), starting))
    for view in starting:
        view.row = svc.refresh(view.name)


@app.command()
def logs(
    name: Annotated[str, typer.Argument(help="Instance.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines (Ctrl-C to end).")] = False,
    tail_n: Annotated[int, typer.Option("--tail", "-n", help="Lines from the end (0 = all).")] = 50,
    stderr: Annotated[bool, typer.Option("--stderr", help="Only stderr (llama-server logs there).")] = False,
    stdout: Annotated[bool, typer.Option("--stdout", help="Only stdout.")] = False,
) -> None:
    """Show an instance's log (stdout and stderr together unless one is chosen).

    Example: llama-orch logs qwen -f --tail 20
    """
    from llama_orchestrator.adapters.logfiles import follow as follow_files
    from llama_orchestrator.adapters.logfiles import tail
    from llama_orchestrator.domain.errors import InstanceNotFound

    svc = service()
    home = svc.home
    if not home.config_path(name).is_file() and not home.log_dir(name).is_dir():
        raise InstanceNotFound(name)
    streams = ["stderr"] if stderr and not stdout else ["stdout"] if stdout and not stderr else ["stdout", "stderr"]
    paths = [home.log_path(name, s) for s in streams]
    # Oldest-written first, so the freshest lines end the output, as in a terminal.
    paths.sort(key=lambda p: p.stat().st_mtime if p.exists() else 0)
    lines: list[str] = []
    for path in paths:
        lines += tail(path, tail_n)
    for line in lines[-tail_n:] if tail_n > 0 else lines:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if follow:
        try:
            for _, line in follow_files(paths, stop=lambda: False):
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass


@app.command()
def health(
    names: Annotated[Optional[list[str]], typer.Argument(help="Instances (default: all running).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Probe instances now: status, response time, last check.

    Example: llama-orch health qwen
    """
    from llama_orchestrator.cli import render
    from llama_orchestrator.domain.states import ACTIVE
    from llama_orchestrator.services.health import check_once

    svc = service()
    chosen = names or [n for n in svc.names() if svc.refresh(n).status in ACTIVE]
    records, unhealthy = [], False
    for name in chosen:
        config, row = svc.load(name), svc.refresh(name)
        if row.status not in ACTIVE:
            records.append({"name": name, "health": "not running", "status": row.status})
            unhealthy = True
            continue
        result = check_once(svc, name, config, row)
        unhealthy |= result.health != "healthy"
        records.append({
            "name": name,
            "status": svc.refresh(name).status,
            "health": str(result.health),
            "response_ms": round(result.outcome.latency_ms, 1) if result.outcome.latency_ms is not None else None,
            "detail": result.outcome.describe(),
            "checked_at": render.timestamp(result.checked_at),
        })
    if json_:
        render.print_json(records)
    else:
        for record in records:
            colour = render.HEALTH_STYLE.get(record["health"], "red")
            say(f"[bold]{record['name']}[/]: [{colour}]{record['health']}[/]")
            if "response_ms" in record:
                say(f"  response time: {record['response_ms']} ms ({record['detail']})")
                say(f"  last check:    {record['checked_at']}")
    if unhealthy:
        raise typer.Exit(1)


@app.command()
def describe(
    name: Annotated[str, typer.Argument(help="Instance.")],
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Everything about one instance: config, runtime state, GGUF metadata, recent events.

    Example: llama-orch describe qwen
    """
    import time

    from llama_orchestrator.cli import render
    from llama_orchestrator.domain.errors import InstanceNotFound

    svc = service()
    view = svc.view(name)
    if view.config is None and view.config_error is None:
        raise InstanceNotFound(name)
    gguf: dict | str | None = None
    if view.config is not None:
        from llama_orchestrator.adapters.gguf_meta import read_gguf_info

        model = view.config.model_path(svc.home.config_path(name).parent)
        try:
            gguf = read_gguf_info(model).as_dict()
        except FileNotFoundError:
            gguf = f"model file not found: {model}"
        except Exception as exc:  # noqa: BLE001 - any reader failure is shown, not fatal
            gguf = f"cannot read GGUF metadata: {exc}"
    events = svc.store.events(name, limit=15)
    record = {
        **render.ps_record(view, time.time()),
        "config_path": str(view.config_path),
        "config": view.config.to_document() if view.config else None,
        "model_file": gguf,
        "events": [{"time": render.timestamp(e.ts), "kind": e.kind, "message": e.message} for e in events],
    }
    if json_:
        render.print_json(record)
        return
    out = render.console()
    out.print(f"[bold]{name}[/]  {render.status_text(view)}  health: {view.row.health}")
    for key in ("pid", "port", "uptime_s", "restarts", "exit_code", "last_error"):
        value = render.duration(record[key]) if key == "uptime_s" else record[key]
        out.print(f"  {key:<10} {value if value is not None else '-'}")
    out.print(f"\n[bold]Config[/] {record['config_path']}")
    if view.config_error:
        out.print(f"[red]{view.config_error}[/]")
    else:
        import json

        out.print(json.dumps(record["config"], indent=2), markup=False)
    out.print("\n[bold]Model file[/]")
    if isinstance(gguf, dict):
        for key, value in gguf.items():
            if key == "size_bytes":
                value = f"{value / 1e6:.1f} MB"
            out.print(f"  {key:<15} {value}")
    else:
        out.print(f"  {gguf}")
    out.print("\n[bold]Events[/]")
    for event in record["events"] or [{"time": "", "kind": "", "message": "(none)"}]:
        out.print(f"  {event['time']}  {event['kind']:<12} {event['message']}", markup=False)


@app.command()
def rm(
    name: Annotated[str, typer.Argument(help="Instance.")],
    force: Annotated[bool, typer.Option("--force", "-f", help="Stop it first if it runs.")] = False,
) -> None:
    """Remove an instance: its config, logs and state.

    Example: llama-orch rm qwen --force
    """
    service().remove(name, force=force)
    say(f"{name} removed")


# -- config ----------------------------------------------------------------------------------------------------


@config_app.command("validate")
def config_validate(
    names: Annotated[Optional[list[str]], typer.Argument(help="Instances (default: all).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Check configs: schema, model file, ports, log folder, binary. Exit 0 valid, 1 problems, 2 broken file.

    Example: llama-orch config validate qwen
    """
    _report_checks(names, lint=False, json_=json_)


@config_app.command("lint")
def config_lint(
    names: Annotated[Optional[list[str]], typer.Argument(help="Instances (default: all).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Like validate, plus warnings (old seed spellings, risky settings).

    Example: llama-orch config lint
    """
    _report_checks(names, lint=True, json_=json_)


def _report_checks(names: Optional[list[str]], *, lint: bool, json_: bool) -> None:
    from rich.markup import escape

    from llama_orchestrator.cli import render
    from llama_orchestrator.services.validation import check_instances

    svc = service()
    reports = check_instances(svc, names or None, lint=lint)
    if json_:
        render.print_json([r.as_dict() for r in reports])
    else:
        out = render.console()
        for report in reports:
            mark = "[green]ok[/]" if report.ok else "[red]invalid[/]"
            out.print(f"{mark}  {report.name}  ({report.path})")
            for problem in report.errors:
                out.print(f"   [red]error[/]   {escape(str(problem))}")
            for warning in report.warnings:
                out.print(f"   [yellow]warning[/] {escape(warning)}")
        if not reports:
            say("no instances to check")
    worst = max((r.exit_code for r in reports), default=0)
    if worst:
        raise typer.Exit(worst)


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of instance configs (for editors: point `$schema` at it).

    Example: llama-orch config schema > llama-instance.schema.json
    """
    from llama_orchestrator.cli.render import print_json
    from llama_orchestrator.domain.config import InstanceConfig

    print_json(InstanceConfig.model_json_schema(by_alias=True))


# -- daemon and events -----------------------------------------------------------------------------------------


@daemon_app.command("start")
def daemon_start() -> None:
    """Start the daemon in the background (one per home; it adopts the instances that already run).

    Example: llama-orch daemon start
    """
    from llama_orchestrator.services import daemon_control

    home = service().home
    running = daemon_control.daemon_info(home)
    if running is not None:
        say(f"daemon already running (pid {running.pid})")
        return
    info = daemon_control.start_daemon(home)
    say(f"daemon started (pid {info.pid}); log: {daemon_control.log_path(home)}")


@daemon_app.command("stop")
def daemon_stop(
    timeout: Annotated[float, typer.Option(help="Seconds to wait before killing it.")] = 15.0,
) -> None:
    """Stop the daemon. Instances keep running (the next daemon adopts them); use `down --all` to stop those.

    Example: llama-orch daemon stop
    """
    from llama_orchestrator.services import daemon_control

    stopped = daemon_control.stop_daemon(service().home, timeout=timeout)
    say("daemon stopped (instances left running)" if stopped else "no daemon was running")


@daemon_app.command("status")
def daemon_status(json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Is the daemon running? Exit 0 when it is, 1 when not.

    Example: llama-orch daemon status
    """
    import time

    from llama_orchestrator.cli import render
    from llama_orchestrator.services import daemon_control

    home = service().home
    info = daemon_control.daemon_info(home)
    record = {
        "running": info is not None,
        "pid": info.pid if info else None,
        "uptime_s": time.time() - info.started_at if info else None,
        "version": info.version if info else None,
        "log": str(daemon_control.log_path(home)),
    }
    if json_:
        render.print_json(record)
    elif info:
        say(f"daemon running (pid {info.pid}, up {render.duration(record['uptime_s'])}), log: {record['log']}")
    else:
        say("daemon not running (start it with `llama-orch daemon start`)")
    if info is None:
        raise typer.Exit(1)


@daemon_app.command("run")
def daemon_run() -> None:
    """Run the daemon in the foreground (for systemd, launchd, Task Scheduler, or to watch it work).

    Example: llama-orch daemon run
    """
    from llama_orchestrator.services.daemon import run_daemon

    run_daemon(service().home)


@app.command()
def events(
    name: Annotated[Optional[str], typer.Argument(help="Only this instance.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events (Ctrl-C to end).")] = False,
    limit: Annotated[int, typer.Option("--tail", "-n", help="How many recent events.")] = 30,
    json_: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """What happened: starts, exits, health changes, restarts, with time and instance.

    Example: llama-orch events -f
    """
    import json
    import time

    from llama_orchestrator.cli import render

    svc = service()
    if name is not None:
        svc.home.checked_name(name)

    def show(batch) -> int:
        last = 0
        for event in batch:
            if json_:
                sys.stdout.write(json.dumps({"id": event.id, "time": event.ts, "instance": event.instance,
                                             "kind": event.kind, "message": event.message}) + "\n")
            else:
                sys.stdout.write(f"{render.timestamp(event.ts)}  {event.instance:<16} {event.kind:<12} "
                                 f"{event.message}\n")
            last = event.id
        sys.stdout.flush()
        return last

    last = show(svc.store.events(name, limit=limit))
    try:
        while follow:
            time.sleep(0.5)  # polling SQLite: other processes write the events
            last = show(svc.store.events(name, limit=1000, after_id=last)) or last
    except KeyboardInterrupt:
        pass


# -- dashboard, daemon, system --------------------------------------------------------------------------------


@app.command()
def dashboard(
    refresh: Annotated[float, typer.Option(help="Seconds between table refreshes.")] = 1.0,
) -> None:
    """Live terminal dashboard of every instance: status, health, CPU, memory, events, logs.

    Example: llama-orch dashboard
    """
    from llama_orchestrator.tui.app import run_dashboard

    run_dashboard(service(), refresh_s=refresh)


def _register_system_commands() -> None:
    # `service`, `bins`, `gpus` and `models` live in cli/system.py (installed-for-good concerns, SPEC §10).
    try:
        from llama_orchestrator.cli import system
    except ImportError:  # pragma: no cover - during development of that module
        return
    system.register(app)


_register_system_commands()


# -- entry point -----------------------------------------------------------------------------------------------


def main() -> None:
    from llama_orchestrator.domain.errors import OrchestratorError

    try:
        app()
    except OrchestratorError as exc:
        from rich.markup import escape

        from llama_orchestrator.cli.render import console

        console(stderr=True).print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
