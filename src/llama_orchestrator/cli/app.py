"""`llama-orch`: the command line's entry point.

``main`` answers `--help` and `ps` through ``cli.fast`` when it can (no typer, rich, pydantic or httpx imported),
else runs the typer app of ``cli.commands``, where the commands are. Exit codes (one place: ``main``): 0 ok,
1 failed, 2 usage or invalid config, 3 not found.

The commands' helpers (``say``, ``service``, ``instances``, ``_state``...) are still reachable as
``cli.app.NAME``: the first such lookup imports ``cli.commands``.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing stays unimported: `--help` and `ps` start in a few tens of milliseconds
if TYPE_CHECKING:
    from typing import Any

    # What the other cli modules take from here, for the type checker (at run time: ``__getattr__``).
    from llama_orchestrator.cli.commands import _state, app, instances, local_only, resolve_names, say, service, warn

__all__ = ["_state", "app", "instances", "local_only", "main", "resolve_names", "say", "service", "warn"]


def __getattr__(name: str) -> Any:
    # `from llama_orchestrator.cli.app import say` (cli/system.py and friends) and `cli.app.app`: the commands
    # module's names, imported on first use so that `main` starts without typer.
    if name.startswith("__"):
        raise AttributeError(name)
    from llama_orchestrator.cli import commands

    try:
        return getattr(commands, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def main() -> None:
    from llama_orchestrator.cli import fast

    argv = sys.argv[1:]
    try:
        code = fast.run(argv)
        if code is None:
            _run_typer(argv)
            return
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code)


def _run_typer(argv: list[str]) -> None:
    """The typer app (the root help it prints recorded for ``cli.fast``); the project's errors mapped to exit codes."""
    from llama_orchestrator.cli import fast
    from llama_orchestrator.domain.errors import OrchestratorError

    try:
        with fast.recording_help(argv):
            from llama_orchestrator.cli.commands import app

            app()
    except OrchestratorError as exc:
        from rich.markup import escape

        from llama_orchestrator.cli.render import console

        console(stderr=True).print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(exc.exit_code)
