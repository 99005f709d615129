"""`llama-orch`'s commands (typer): they parse, call a service, render; nothing else. ``cli.app.main`` runs them.

Instance commands (up, down, restart, ps, logs, health, describe, events) call the instances port
(``services.instances_port``), chosen once per run by ``instances()``: with ``--host URL`` the API of that node's
daemon; else, when this home's daemon runs and serves its API (``api_url`` in its PID file), that API, so the CLI,
the dashboard and remote use share one path; else the home itself (``LocalInstances``). Commands that edit files
(init, rm, config) always act on the home and refuse ``--host``.

Imports of anything heavier than typer happen inside the commands. `--help` and `ps` mostly never get here:
``cli.fast`` answers them without typer. Exit codes (one place: ``cli.app.main``): 0 ok, 1 failed, 2 usage or
invalid config, 3 not found.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

if TYPE_CHECKING:
    from llama_orchestrator.services.instances import InstanceService
    from llama_orchestrator.services.instances_port import InstancesPort

app = typer.Typer(
    name="llama-orch",
    help="Docker-like control plane for llama.cpp llama-server instances.\n\n"
    "Example: llama-orch init qwen --model ./qwen.gguf && llama-orch up qwen -d --wait && llama-orch ps\n\n"
    "Commands go through the daemon's HTTP API when the home's daemon runs (or to another node's with --host), "
    "else they act on the home directly.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion bash|zsh|fish|powershell
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Validate instance configs and print their JSON Schema.", no_args_is_help=True)
app.add_typer(config_app, name="config")
daemon_app = typer.Typer(help="The supervisor: health checks and restarts in the background.", no_args_is_help=True)
app.add_typer(daemon_app, name="daemon")
NO_DAEMON_ENV = "LLAMA_ORCH_NO_DAEMON"

HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home",
        envvar="LLAMA_ORCH_HOME",
        help="Home folder (default: $LLAMA_ORCH_HOME, else the platform's user data folder).",
        show_default=False,
    ),
]
HostOption = Annotated[
    str | None,
    typer.Option(
        "--host",
        envvar="LLAMA_ORCH_HOST",
        help="Another node's daemon API, e.g. http://gpu-box:8000 "
        "(default: this home's daemon when it runs, else the home itself).",
        show_default=False,
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="LLAMA_ORCH_API_KEY",
        help="Bearer key for the daemon's control API "
        "(default for this home's daemon: the first control key in orchestrator.json). On a shared machine "
        "set LLAMA_ORCH_API_KEY instead: a command line is visible to every user in `ps`.",
        show_default=False,
    ),
]
_state: dict[str, Any] = {}  # this invocation: the root options, then the service and port made from them


@app.callback()
def _root(home: HomeOption = None, host: HostOption = None, api_key: ApiKeyOption = None) -> None:
    _state["home"] = home
    _state["host"] = host or None
    _state["api_key"] = api_key or None


def service() -> InstanceService:
    from llama_orchestrator.adapters.home import Home
    from llama_orchestrator.services.instances import InstanceService

    if "service" not in _state:
        # secure(): the home private to its user (0700/0600), what an older version left open tightened.
        _state["service"] = InstanceService(Home.resolve(_state.get("home")).secure())
    return _state["service"]


def instances() -> InstancesPort:
    """Where commands act: ``--host``'s daemon; else this home's daemon when it serves its API; else the home."""
    if "port" not in _state:
        _state["port"] = _choose_port()
    return _state["port"]


def _choose_port() -> InstancesPort:
    host, key = _state.get("host"), _state.get("api_key")
    if host:
        from llama_orchestrator.adapters.api_client import RemoteInstances

        return RemoteInstances.connect(str(host), key)
    from llama_orchestrator.services import daemon_control
    from llama_orchestrator.services.instances_port import LocalInstances

    svc = service()
    running = daemon_control.daemon_info(svc.home)
    if running is not None and running.api_url:
        from llama_orchestrator.adapters.api_client import ApiUnreachable, RemoteInstances

        remote = RemoteInstances.connect(running.api_url, key or _local_control_key(svc))
        try:
            remote.ping()
            return remote
        except ApiUnreachable as exc:
            warn(f"the daemon (pid {running.pid}) does not answer on its API ({exc}); acting on the home directly")
    return LocalInstances(svc)


def _local_control_key(svc: InstanceService) -> str | None:
    """This home's daemon: the CLI runs on the same machine and may read its keys (validated again only when
    ``orchestrator.json`` changed)."""
    from llama_orchestrator.adapters.config_cache import control_key

    return control_key(svc.home.settings_path, svc.home.state_dir)


def local_only(command: str) -> None:
    """Commands that edit files in the home run where the home is, never against another node."""
    from llama_orchestrator.domain.errors import UsageError

    if _state.get("host"):
        raise UsageError(
            f"`{command}` edits files in the home of this machine and cannot act on --host "
            f"{_state['host']}: run it on that node"
        )


def checked_name(name: str) -> str:
    from llama_orchestrator.adapters.home import Home

    return Home(Path(".")).checked_name(name)  # the rule alone: no folder is touched


def say(message: str) -> None:
    from llama_orchestrator.cli.render import console

    console().print(message)


def warn(message: str) -> None:
    from llama_orchestrator.cli.render import console

    console(stderr=True).print(f"[yellow]warning:[/] {message}")


def resolve_names(names: list[str], all_: bool, *, autostart_only: bool = False) -> list[str]:
    from llama_orchestrator.domain.errors import UsageError

    if all_:
        if names:
            raise UsageError("give instance names or --all, not both")
        return instances().names(autostart_only=autostart_only)
    if not names:
        raise UsageError("name at least one instance, or use --all")
    for name in names:
        checked_name(name)
    return names


# -- init ------------------------------------------------------------------------------------------------------


@app.command()
def init(
    name: Annotated[str, typer.Argument(help="Instance name: lowercase letters, digits, dashes.")],
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="GGUF model file, hf.co/<user>/<repo>[:QUANT] (pulled when needed) or a catalog ID."
        ),
    ],
    port: Annotated[int | None, typer.Option(help="Port (default: the first free one from 8001).")] = None,
    host: Annotated[str, typer.Option(help="Listen address.")] = "127.0.0.1",
    context_size: Annotated[
        int | None,
        typer.Option(
            "--context-size",
            "-c",
            help="Context size in tokens (default: the model's trained context, capped by the memory budget).",
            show_default=False,
        ),
    ] = None,
    gpu_layers: Annotated[
        int | None,
        typer.Option(
            "--gpu-layers",
            help="Layers on the GPU (0 = CPU, -1 = all; default 0, or the profile's).",
            show_default=False,
        ),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help="auto, cpu, vulkan, cuda, metal or rocm (default auto, or the profile's).", show_default=False
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads (default: llama-server's choice, or the profile's).")
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            help="Defaults for this machine: cpu, vulkan, cuda, metal or "
            "auto (threads from the core count, GPU layers, device)."
        ),
    ] = None,
    parallel: Annotated[int, typer.Option(help="Concurrent request slots.")] = 1,
    binary: Annotated[str | None, typer.Option(help="llama-server: a registered name or a path.")] = None,
    restart: Annotated[str, typer.Option(help="always, on-failure, unless-stopped or never.")] = "on-failure",
    autostart: Annotated[bool, typer.Option(help="Start with `up --all` and when the daemon starts.")] = False,
    arg: Annotated[list[str] | None, typer.Option("--arg", help="Extra llama-server argument (repeat).")] = None,
) -> None:
    """Create an instance config in the home (refuses to overwrite).

    Example: llama-orch init qwen --model ~/models/qwen2.5-0.5b-q4_k_m.gguf --context-size 8192
    """
    from pydantic import ValidationError

    from llama_orchestrator.adapters.config_files import problems_from
    from llama_orchestrator.domain.config import InstanceConfig
    from llama_orchestrator.domain.errors import ConfigError, NotFoundError

    local_only("init")
    svc = service()
    svc.home.checked_name(name)
    from llama_orchestrator.cli.models_cli import memory_warning, model_for_init
    from llama_orchestrator.services.model_store import memory_plan

    model_path, source = model_for_init(model)
    if not model_path.is_file():
        raise NotFoundError(f"model file {str(model_path)!r} not found")
    plan = memory_plan(svc.home, model_path, context_size)
    document: dict[str, Any] = {
        "name": name,
        "model": {"path": str(model_path), "context_size": plan.context_size, "threads": threads, "source": source},
        "server": {"host": host, "port": port or 8001, "parallel": parallel},
        "gpu": {"backend": backend, "layers": gpu_layers},
        "restart": {"policy": restart},
        "autostart": autostart,
        "binary": binary,
        "args": arg or [],
    }
    if profile is not None:
        from llama_orchestrator.domain.profiles import merge_under, profile_defaults
        from llama_orchestrator.services.system_service import gpu_overview

        overview = gpu_overview(svc.home, binary=binary)
        defaults = profile_defaults(
            profile, physical_cores=overview.physical_cores, devices=overview.report.devices, platform=sys.platform
        )
        document = merge_under(defaults, document)  # what the user typed wins over the profile
    document["model"] = {k: v for k, v in document["model"].items() if v is not None}
    document["gpu"] = {k: v for k, v in document["gpu"].items() if v is not None}
    try:
        config = InstanceConfig.from_document(document)
    except ValidationError as exc:
        raise ConfigError("command-line options", problems_from(exc, document)) from None
    config = svc.create(config, auto_port=port is None)
    say(f"created [bold]{name}[/] on port {config.server.port}: {svc.home.config_path(name)}")
    memory_warning(svc.home, config, plan)
    say(f"start it with: llama-orch up {name} -d --wait")


# -- up / down / restart ---------------------------------------------------------------------------------------


@app.command()
def up(
    names: Annotated[list[str] | None, typer.Argument(help="Instances to start.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every instance with autostart (all when none has it).")] = False,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Start in the background and return.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Return only when healthy (fails if it exits).")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits for healthy.")] = 120.0,
    no_recreate: Annotated[
        bool, typer.Option("--no-recreate", help="Leave running instances alone even when their config changed.")
    ] = False,
    force_recreate: Annotated[
        bool, typer.Option("--force-recreate", help="Recreate running instances even when their config is unchanged.")
    ] = False,
    no_daemon: Annotated[
        bool,
        typer.Option(
            "--no-daemon",
            envvar=NO_DAEMON_ENV,
            help="With -d: don't start the daemon even if a restart policy needs it.",
        ),
    ] = False,
) -> None:
    """Start instances, and apply changed configs as compose does: a running instance whose config changed is
    recreated (stopped, started with the new config), an unchanged one is left alone. Instances sharing an alias
    are recreated one at a time, each healthy before the next.

    Without -d the new log lines stream here and Ctrl-C stops the instances this `up` started (as `docker compose
    up`). With -d, the daemon is started too when an instance's restart policy needs supervision.

    Example: llama-orch up qwen -d --wait
    """
    from llama_orchestrator.domain.errors import OrchestratorError, StartError, UsageError

    if no_recreate and force_recreate:
        raise UsageError("--no-recreate and --force-recreate contradict each other: choose one")
    port = instances()
    chosen = resolve_names(names or [], all_, autostart_only=True)
    if all_ and not chosen:
        chosen = port.names()
    recreate: Literal["changed", "never", "force"] = (
        "never" if no_recreate else "force" if force_recreate else "changed"
    )
    actions = port.plan(chosen, recreate=recreate)
    stream = port.attach(chosen) if not detach and chosen else None  # from the logs' ends now: only new lines
    failures: list[str] = []
    started: list[dict] = []  # started or recreated by this `up`: waited for, and what Ctrl-C stops
    for action in actions:
        name = action["name"]
        try:
            outcome = _apply_one(port, action, wait=wait, timeout=timeout)
        except OrchestratorError as exc:
            if len(chosen) == 1:
                raise
            failures.append(str(exc))
            continue
        if outcome is not None:
            started.append(outcome)
    for outcome in list(started if detach or wait else []):
        name = outcome["name"]
        if outcome.get("healthy"):
            continue  # a recreate that waited already (replicas are always waited for)
        try:
            if wait:
                port.wait(name, until="healthy", timeout=timeout)
                say(f"{name} [green]healthy[/]")
            else:
                port.wait(name, until="started", timeout=timeout)
        except StartError as exc:
            failures.append(str(exc))
    if detach and started and not no_daemon and port.origin == "local":
        _ensure_daemon_for([o["name"] for o in started if o.get("restart_policy") != "never"])
    if failures:
        raise StartError("\n".join(failures))
    if stream is not None:
        _attach(port, stream, chosen, [o["name"] for o in started])


def _apply_one(port: InstancesPort, action: dict, *, wait: bool, timeout: float) -> dict | None:
    """One instance of `up`: start, recreate or leave it, and say which. Returns the outcome of what it started."""
    name = action["name"]
    kind = action["action"]
    if kind == "recreate":
        what = ", ".join(action["changes"]) or action["reason"]
        say(f"{name} recreating ({what})")
        outcome = port.recreate(name, wait=wait, timeout=timeout)
        say(
            f"{name} recreated (pid {outcome['old_pid']} -> {outcome['pid']}, port {outcome['port']})"
            + (" [green]healthy[/]" if outcome.get("healthy") else "")
        )
        return outcome
    if kind == "leave":
        drift = f"; config changed ({', '.join(action['changes'])}), not applied" if action["changes"] else ""
        say(f"{name} unchanged: already {action.get('status') or 'running'} (pid {action.get('pid')}){drift}")
        return None
    outcome = port.start(name)  # start, and report-invalid: the start raises the config's error
    if outcome["already_running"]:
        say(f"{name} is already {outcome['status']} (pid {outcome['pid']})")
        return None
    say(f"{name} starting (pid {outcome['pid']}, port {outcome['port']})")
    return outcome


def _ensure_daemon_for(needing: list[str]) -> None:
    from llama_orchestrator.services import daemon_control

    home = service().home
    if not needing or daemon_control.daemon_info(home) is not None:
        return
    info = daemon_control.start_daemon(home)
    say(f"daemon started (pid {info.pid}) to supervise {', '.join(needing)}")


def _attach(port: InstancesPort, stream, names: list[str], started: list[str]) -> None:
    """Stream the instances' new log lines until they all exit, or Ctrl-C, which stops the ones this `up` started
    (not those that were already running)."""
    width = max(len(n) for n in names)
    try:
        for name, line in stream:
            sys.stdout.write(f"{name:<{width}} | {line}\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stderr.write(f"stopping {', '.join(started)}...\n" if started else "detaching (nothing was started)\n")
        for name in started:
            port.stop(name)
        return
    raise typer.Exit(1)


@app.command()
def down(
    names: Annotated[list[str] | None, typer.Argument(help="Instances to stop.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Stop every instance.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait after SIGTERM before killing the tree.")] = 10.0,
) -> None:
    """Stop instances: SIGTERM (CTRL_BREAK on Windows), then kill the whole process tree after --timeout.

    Example: llama-orch down qwen
    """
    port = instances()
    for name in resolve_names(names or [], all_):
        outcome = port.stop(name, timeout)
        say(f"{name} stopped" if outcome["was_running"] else f"{name} was not running")


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
    port = instances()
    for name in resolve_names(names, False):
        outcome = port.restart(name, timeout=timeout)
        say(f"{name} restarted (pid {outcome['pid']})")
        if wait:
            port.wait(name, until="healthy", timeout=wait_timeout)
            say(f"{name} [green]healthy[/]")


# -- ps / logs / health / describe / rm ------------------------------------------------------------------------


@app.command()
def ps(
    all_: Annotated[
        bool, typer.Option("--all", "-a", help="Also state left by instances whose config is gone.")
    ] = False,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output (a JSON array).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only names, one per line.")] = False,
    filters: Annotated[
        list[str] | None,
        typer.Option(
            "--filter",
            "-f",
            help="KEY=VALUE, repeatable: status, health, name (substring), model (substring of the "
            "path), alias, backend. One key's values are alternatives; different keys must all match.",
        ),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="json (one object per line), a template such as '{{.Name}} {{.Status}}', or 'table' and "
            "a template (with a header).",
        ),
    ] = None,
) -> None:
    """List instances: NAME STATUS HEALTH PID PORT BACKEND MODEL UPTIME RESTARTS.

    STATUS ends in * when the process runs another config than its file declares (`up NAME -d` applies it);
    `--json` rows carry `config_changed`. With -a, instances whose config folder is gone show `(config removed)`.

    Example: llama-orch ps --filter status=running --format '{{.Name}}\t{{.Port}}'
    """
    from llama_orchestrator.cli import ps_query, render

    wanted = ps_query.parse_filters(filters or [])
    records = ps_query.apply_filters(instances().ps(include_orphans=all_), wanted)
    if quiet:
        sys.stdout.write("".join(r["name"] + "\n" for r in records))
        return
    if fmt is not None:
        sys.stdout.write(ps_query.render_format(render.json_ready(records), fmt, render.ps_cell))
        return
    if json_:
        render.print_json(records)
        return
    if not records:
        say("no instances yet: create one with `llama-orch init NAME --model FILE.gguf`")
        return
    render.console().print(render.ps_table(records))
    for line in render.ps_legend(records):
        render.console().print(line, markup=False, style="dim")


@app.command()
def logs(
    name: Annotated[str, typer.Argument(help="Instance.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines (Ctrl-C to end).")] = False,
    tail_n: Annotated[int, typer.Option("--tail", "-n", help="Lines from the end (0 = all).")] = 50,
    stderr: Annotated[bool, typer.Option("--stderr", help="Only stderr (llama-server logs there).")] = False,
    stdout: Annotated[bool, typer.Option("--stdout", help="Only stdout.")] = False,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Only lines written from then on: a duration back (10m, 1h30m), Unix seconds or an ISO-8601 time.",
            show_default=False,
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", help="Only lines written up to then (same forms as --since).", show_default=False),
    ] = None,
    timestamps: Annotated[
        bool, typer.Option("--timestamps", "-t", help="Start each line with its time (RFC 3339, UTC).")
    ] = False,
) -> None:
    """Show an instance's log (stdout and stderr together, in time order, unless one is chosen).

    llama-server writes no times: a line's time is when the daemon saw it written, within about a second (without
    a daemon watching, the log file's last change). Example: llama-orch logs qwen -f --since 10m -t
    """
    import time

    from llama_orchestrator.domain.timespec import BadTime, parse_range

    if tail_n < 0:
        raise _usage("--tail must be 0 or more")
    try:
        since_ts, until_ts = parse_range(since, until, time.time())
    except BadTime as exc:
        raise _usage(str(exc)) from None
    streams = ("stderr",) if stderr and not stdout else ("stdout",) if stdout and not stderr else ("stdout", "stderr")
    lines = instances().logs(
        checked_name(name),
        tail=tail_n,
        streams=streams,
        follow=follow,
        since=since_ts,
        until=until_ts,
        timestamps=timestamps,
    )
    try:
        for line in lines:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        if not follow:
            raise


@app.command()
def health(
    names: Annotated[list[str] | None, typer.Argument(help="Instances (default: all running).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Probe instances now: status, response time, last check.

    Example: llama-orch health qwen
    """
    from llama_orchestrator.cli import render

    records = instances().health([checked_name(n) for n in names] if names else None)
    unhealthy = any(r["health"] != "healthy" for r in records)
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
    from llama_orchestrator.cli import render

    record = instances().describe(checked_name(name))
    if json_:
        render.print_json(record)
        return
    render.print_describe(record)


@app.command()
def rm(
    name: Annotated[str, typer.Argument(help="Instance.")],
    force: Annotated[bool, typer.Option("--force", "-f", help="Stop it first if it runs.")] = False,
) -> None:
    """Remove an instance: its config, logs and state.

    Example: llama-orch rm qwen --force
    """
    local_only("rm")
    service().remove(name, force=force)
    say(f"{name} removed")


# -- config ----------------------------------------------------------------------------------------------------


@config_app.command("validate")
def config_validate(
    names: Annotated[list[str] | None, typer.Argument(help="Instances (default: all).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Check configs: schema, model file, ports, log folder, binary. Exit 0 valid, 1 problems, 2 broken file.

    Example: llama-orch config validate qwen
    """
    _report_checks(names, lint=False, json_=json_)


@config_app.command("lint")
def config_lint(
    names: Annotated[list[str] | None, typer.Argument(help="Instances (default: all).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Like validate, plus warnings (old seed spellings, risky settings).

    Example: llama-orch config lint
    """
    _report_checks(names, lint=True, json_=json_)


def _report_checks(names: list[str] | None, *, lint: bool, json_: bool) -> None:
    from rich.markup import escape

    from llama_orchestrator.cli import render
    from llama_orchestrator.services.validation import check_instances

    local_only("config lint" if lint else "config validate")
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

    local_only("daemon start")
    home = service().home
    running = daemon_control.daemon_info(home)
    if running is not None:
        say(f"daemon already running (pid {running.pid})")
        return
    info = daemon_control.start_daemon(home)
    say(f"daemon started (pid {info.pid}); log: {daemon_control.log_path(home)}")
    say(f"API: {info.api_url}" if info.api_url else "API: off (api.enabled is false in orchestrator.json)")


@daemon_app.command("stop")
def daemon_stop(
    timeout: Annotated[float, typer.Option(help="Seconds to wait before killing it.")] = 15.0,
) -> None:
    """Stop the daemon. Instances keep running (the next daemon adopts them); use `down --all` to stop those.

    Example: llama-orch daemon stop
    """
    from llama_orchestrator.services import daemon_control

    local_only("daemon stop")
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

    if _state.get("host"):
        _remote_daemon_status(json_)
        return
    home = service().home
    info = daemon_control.daemon_info(home)
    record: dict[str, Any] = {
        "running": info is not None,
        "pid": info.pid if info else None,
        "uptime_s": time.time() - info.started_at if info else None,
        "version": info.version if info else None,
        "log": str(daemon_control.log_path(home)),
        "api_url": info.api_url if info else None,
    }
    if json_:
        render.print_json(record)
    elif info:
        say(f"daemon running (pid {info.pid}, up {render.duration(record['uptime_s'])}), log: {record['log']}")
        if info.api_url:
            say(f"API: {info.api_url}")
    else:
        say("daemon not running (start it with `llama-orch daemon start`)")
    if info is None:
        raise typer.Exit(1)


def _remote_daemon_status(json_: bool) -> None:
    from llama_orchestrator.adapters.api_client import ApiUnreachable, RemoteInstances
    from llama_orchestrator.cli import render

    try:
        key = _state.get("api_key")
        record = {
            "running": True,
            **RemoteInstances.connect(str(_state["host"]), key if isinstance(key, str) else None).ping(),
        }
    except ApiUnreachable as exc:
        record = {"running": False, "api_url": _state["host"], "error": str(exc)}
    if json_:
        render.print_json(record)
    elif record["running"]:
        say(
            f"daemon running at {record.get('api_url')} (pid {record.get('pid')}, "
            f"up {render.duration(record.get('uptime_s'))}, version {record.get('version')})"
        )
    else:
        say(f"daemon not reachable: {record['error']}")
    if not record["running"]:
        raise typer.Exit(1)


@daemon_app.command("reload")
def daemon_reload() -> None:
    """Ask the daemon for one reconcile pass now: start new autostart instances, recreate running ones whose config
    changed, stop those whose config was removed (what `reload: "auto"` in orchestrator.json does by itself).

    Example: llama-orch daemon reload
    """
    import os
    import signal

    from llama_orchestrator.domain.errors import UsageError
    from llama_orchestrator.services import daemon_control

    if not _state.get("host"):
        info = daemon_control.daemon_info(service().home)
        if info is None:
            raise UsageError(
                "no daemon runs for this home: start it with `llama-orch daemon start`, or apply "
                "config changes with `llama-orch up NAME -d`"
            )
        if not info.api_url:  # no API to ask: the signal (POSIX)
            if not hasattr(signal, "SIGHUP"):
                raise UsageError("the daemon serves no API (api.enabled is false) and this OS has no SIGHUP")
            os.kill(info.pid, signal.SIGHUP)
            say(f"reload requested (SIGHUP to pid {info.pid})")
            return
    instances().reload()
    say("reload requested: the daemon applies the configs now (`llama-orch events -f` shows what it does)")


@daemon_app.command("run")
def daemon_run(
    router_only: Annotated[
        bool,
        typer.Option(
            "--router-only",
            help="Serve only the router over the `peers` of orchestrator.json; refuses a home with instances.",
        ),
    ] = False,
) -> None:
    """Run the daemon in the foreground (for systemd, launchd, Task Scheduler, or to watch it work).

    Example: llama-orch daemon run
    """
    from llama_orchestrator.services.daemon import run_daemon

    local_only("daemon run")
    if router_only and service().names():
        raise _usage(
            f"--router-only: the home {service().home.root} has instances "
            f"({', '.join(service().names())}); give it a home of its own"
        )
    run_daemon(service().home)


@app.command()
def events(
    name: Annotated[str | None, typer.Argument(help="Only this instance.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events (Ctrl-C to end).")] = False,
    limit: Annotated[
        int | None,
        typer.Option(
            "--tail",
            "-n",
            help="How many recent events (default 30; 0: none, so `-f --tail 0` prints only new ones).",
            show_default=False,
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Only events from then on: a duration back (10m, 1h30m), Unix seconds or an ISO-8601 time.",
            show_default=False,
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", help="Only events up to then (same forms as --since).", show_default=False),
    ] = None,
    json_: Annotated[
        bool, typer.Option("--json", help="A JSON array (with -f: one object per line, as it streams).")
    ] = False,
) -> None:
    """What happened: starts, exits, health changes, restarts, with time and instance.

    Example: llama-orch events -f --tail 0
    """
    import time

    from llama_orchestrator.cli import render
    from llama_orchestrator.domain.timespec import BadTime, parse_range

    if limit is not None and limit < 0:
        raise _usage("--tail must be 0 or more")
    try:
        since_ts, until_ts = parse_range(since, until, time.time())
    except BadTime as exc:
        raise _usage(str(exc)) from None
    port = instances()
    if name is not None:
        checked_name(name)

    def wanted(event: dict) -> bool:
        return (since_ts is None or event["time"] >= since_ts) and (until_ts is None or event["time"] <= until_ts)

    def show(batch: list[dict], *, stream: bool) -> None:
        if json_ and not stream:
            render.print_json(batch)
            return
        for event in batch:
            if json_:
                sys.stdout.write(render.json_line(event))
            else:
                sys.stdout.write(
                    f"{render.timestamp(event['time'])}  {event['instance']:<16} {event['kind']:<12} "
                    f"{event['message']}\n"
                )
        sys.stdout.flush()

    # --since alone shows everything since then (as `docker events --since`); --tail caps it.
    count = limit if limit is not None else (10_000 if since_ts is not None else 30)
    latest = port.events(name, limit=max(count, 1))
    last = latest[-1]["id"] if latest else 0
    history = [e for e in latest if wanted(e)][-count:] if count else []
    show(history, stream=follow)
    try:
        while follow and (until_ts is None or time.time() <= until_ts):
            time.sleep(0.5)  # polling: other processes write the events
            batch = port.events(name, limit=1000, after_id=last)
            if batch:
                last = batch[-1]["id"]
                show([e for e in batch if wanted(e)], stream=True)
    except KeyboardInterrupt:
        pass


@app.command()
def stats(
    names: Annotated[list[str] | None, typer.Argument(help="Instances (default: every running one).")] = None,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="One sample, then exit.")] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between samples.", min=0.2)] = 1.0,
    json_: Annotated[bool, typer.Option("--json", help="A JSON array per sample.")] = False,
) -> None:
    """Live CPU, memory, requests and tokens per second of each instance (as `docker stats`).

    CPU % is of one core (200% = two busy cores); requests and tokens come from the daemon's router (`--` without
    a daemon). Example: llama-orch stats --no-stream
    """
    import time

    from llama_orchestrator.cli import render
    from llama_orchestrator.cli import stats as st

    port = instances()
    local = not _state.get("host")  # another node's pids are not this machine's
    client = getattr(port, "client", None)

    def metrics() -> str | None:
        if client is None:
            return None
        try:
            return "\n".join(client.stream_lines("/metrics"))
        except Exception:  # noqa: BLE001 - the table without the router's rates rather than no table
            return None

    def records() -> list[dict]:
        listed = port.ps()
        if names:
            known = {r["name"] for r in listed}
            for name in names:
                if checked_name(name) not in known:
                    from llama_orchestrator.domain.errors import InstanceNotFound

                    raise InstanceNotFound(name)
            return [r for r in listed if r["name"] in names]
        return [r for r in listed if r.get("pid")]

    def show(rows: list[dict]) -> None:
        if json_:
            render.print_json(rows)
        else:
            render.console().print(st.table(rows))
        sys.stdout.flush()

    listed = records()
    before = st.take(listed, metrics(), time.monotonic(), local=local)
    try:
        while True:
            time.sleep(interval)  # the span the rates are measured over
            listed = records()
            after = st.take(listed, metrics(), time.monotonic(), local=local)
            if not no_stream and not json_ and sys.stdout.isatty():
                sys.stdout.write("\x1b[2J\x1b[H")  # redraw in place, as docker stats does
            show(st.rows([r["name"] for r in listed], before, after))
            if no_stream:
                return
            before = after
    except KeyboardInterrupt:
        pass


def _usage(message: str) -> Exception:
    from llama_orchestrator.domain.errors import UsageError

    return UsageError(message)


# -- dashboard, daemon, system --------------------------------------------------------------------------------


@app.command()
def dashboard(
    refresh: Annotated[float, typer.Option(help="Seconds between table refreshes.")] = 1.0,
) -> None:
    """Live terminal dashboard of every instance: status, health, CPU, memory, events, logs.

    With --host, another node's instances through its daemon's API (CPU and memory show as —).
    Example: llama-orch dashboard; llama-orch --host http://gpu-box:8000 dashboard
    """
    from llama_orchestrator.tui.app import run_dashboard

    # The same port as every instance command: --host's daemon, else this home's daemon, else the home.
    run_dashboard(instances(), same_machine=not _state.get("host"), refresh_s=refresh)


def _register_system_commands() -> None:
    # `service`, `bins`, `gpus` and `models` live in cli/system.py (installed-for-good concerns, SPEC §10).
    try:
        from llama_orchestrator.cli import system
    except ImportError:  # pragma: no cover - during development of that module
        return
    system.register(app)


_register_system_commands()
