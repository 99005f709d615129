"""The llama-server launch (domain.launch): pure, so tested with plain values."""

from __future__ import annotations

from pathlib import Path


def test_every_launch_carries_the_marker_and_the_config_cannot_forge_it(tmp_path: Path) -> None:
    from llama_orchestrator.domain.config import InstanceConfig
    from llama_orchestrator.domain.launch import MARKER_HOME, MARKER_INSTANCE, build_launch

    config = InstanceConfig.from_document(
        {"name": "qwen", "model": {"path": "m.gguf"}, "env": {MARKER_INSTANCE: "other", "FOO": "1"}}
    )
    base = {MARKER_HOME: "/inherited", "PATH": "/bin"}
    env = build_launch(config, Path("/bin/llama-server"), Path("m.gguf"), base, platform="linux", home=tmp_path).env
    assert (env[MARKER_HOME], env[MARKER_INSTANCE], env["FOO"], env["PATH"]) == (str(tmp_path), "qwen", "1", "/bin")
    unmarked = build_launch(config, Path("/bin/llama-server"), Path("m.gguf"), base, platform="linux").env
    assert MARKER_HOME not in unmarked and MARKER_INSTANCE not in unmarked, "an inherited marker is never passed on"
