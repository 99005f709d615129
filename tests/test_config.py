"""Instance configs: both seed dialects load, and every malformed one is refused with the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from conftest import Cli, instance_doc
from helpers import free_port
from llama_orchestrator.adapters.config_files import load_config
from llama_orchestrator.domain.config import InstanceConfig, is_valid_name
from llama_orchestrator.domain.errors import ConfigError

SEED_000 = {  # seed 000's example, verbatim
    "name": "gpt-oss",
    "model": {"path": "../../models/gpt-oss-20b-Q4_K_S.gguf", "context_size": 4096, "batch_size": 512, "threads": 16},
    "server": {"host": "127.0.0.1", "port": 8001, "parallel": 4},
    "gpu": {"layers": 0, "backend": "vulkan"},
    "health": {"interval_seconds": 30, "timeout_seconds": 5, "max_failures": 3},
    "restart": {"policy": "on-failure", "max_retries": 5, "backoff_seconds": 10},
}
SEED_001 = {  # seed 001's example, verbatim
    "$schema": "llama-instance-schema.json",
    "name": "gpt-oss-20b",
    "model": {"path": "../../models/gpt-oss-20b-Q4_K_S.gguf", "context_size": 4096, "batch_size": 512, "threads": 16},
    "server": {"host": "127.0.0.1", "port": 8001, "timeout": 600, "parallel": 4},
    "gpu": {"backend": "vulkan", "device_id": 1, "layers": 30},
    "env": {"GGML_VULKAN_DEVICE": "1"},
    "args": [],
    "healthcheck": {"path": "/health", "interval": 10, "timeout": 5, "retries": 3, "start_period": 60},
    "restart_policy": {"enabled": True, "max_retries": 5, "backoff_multiplier": 2.0},
    "logs": {"stdout": "logs/{name}/stdout.log", "stderr": "logs/{name}/stderr.log", "max_size_mb": 100, "rotation": 5},
}


def test_seed_000_dialect_loads_with_renamed_health_fields() -> None:
    config = InstanceConfig.from_document(SEED_000)
    assert (config.healthcheck.interval, config.healthcheck.timeout, config.healthcheck.retries) == (30, 5, 3)
    assert config.restart.policy == "on-failure" and config.gpu.backend == "vulkan"


def test_seed_001_dialect_loads_with_restart_policy_mapped() -> None:
    config = InstanceConfig.from_document(SEED_001)
    assert config.restart.policy == "on-failure" and config.restart.backoff_multiplier == 2.0
    assert config.gpu.device_id == 1 and config.server.timeout == 600
    disabled = InstanceConfig.from_document({**SEED_001, "restart_policy": {"enabled": False}})
    assert disabled.restart.policy == "never"


def test_seed_001_gpu_layers_under_model_moves_to_gpu() -> None:
    doc = {"name": "old", "model": {"path": "m.gguf", "gpu_layers": 30}, "gpu": {"backend": "vulkan"}}
    assert InstanceConfig.from_document(doc).gpu.layers == 30


def test_model_path_is_relative_to_the_config_folder(tmp_path: Path) -> None:
    config = InstanceConfig.from_document(SEED_000)
    folder = tmp_path / "instances" / "gpt-oss"
    assert config.model_path(folder) == (tmp_path / "models" / "gpt-oss-20b-Q4_K_S.gguf").resolve()


@pytest.mark.parametrize(
    "name, valid",
    [
        ("a", True),
        ("qwen-7b", True),
        ("x" * 63, True),
        ("x" * 64, False),
        ("-a", False),
        ("a-", False),
        ("A", False),
        ("a_b", False),
        ("../x", False),
        ("a/b", False),
        ("", False),
        ("a.b", False),
    ],
)
def test_instance_names(name: str, valid: bool) -> None:
    assert is_valid_name(name) is valid


# Each malformed config, and the words its error message must contain (the field, what is wrong).
MALFORMED = {
    "port-too-high": ({"server": {"port": 70000}}, ["server.port", "65535", "70000"]),
    "port-a-string": ({"server": {"port": "eighty"}}, ["server.port", "integer"]),
    "unknown-field": (
        {"model": {"path": "m.gguf", "contex_size": 10}},
        ["model.contex_size", "did you mean 'context_size'"],
    ),
    "unknown-top-level": ({"gpus": {}}, ["gpus", "unknown field", "did you mean 'gpu'"]),
    "missing-model": ({"model": None}, ["model"]),
    "bad-backend": ({"gpu": {"backend": "opencl"}}, ["gpu.backend", "vulkan"]),
    "bad-policy": ({"restart": {"policy": "sometimes"}}, ["restart.policy", "unless-stopped"]),
    "negative-retries": ({"healthcheck": {"retries": 0}}, ["healthcheck.retries", "greater than or equal to 1"]),
    "bad-name": ({"name": "Bad_Name"}, ["name", "lowercase letters"]),
    "reserved-args": ({"args": ["--port", "1"]}, ["args must not set --port"]),
    "env-not-strings": ({"env": {"A": 1}}, ["env.A", "string"]),
}


def _document(name: str, patch: dict) -> dict:
    base = {"name": name, "model": {"path": "m.gguf"}}
    for key, value in patch.items():
        if value is None:
            base.pop(key)
        else:
            base[key] = value
    return base


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_configs_name_the_file_and_field(case: str, tmp_path: Path) -> None:
    patch, words = MALFORMED[case]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_document("x", patch)))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_broken_json_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{\n  "name": "x",\n  "model": {"path": "m.gguf",}\n}\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "line 3, column" in str(caught.value) and str(path) in str(caught.value)


def test_folder_and_name_must_agree(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"name": "other", "model": {"path": "m.gguf"}}))
    with pytest.raises(ConfigError, match="folder is 'mine'"):
        load_config(path, expected_name="mine")


@pytest.mark.parametrize("case", [*sorted(MALFORMED), "broken-json"])
def test_cli_refuses_every_malformed_config_with_exit_2_and_no_process(
    case: str, cli: Cli, tiny_model: Path, fake_binary: Path
) -> None:
    name = "broken"
    path = cli.home / "instances" / name / "config.json"
    path.parent.mkdir(parents=True)
    if case == "broken-json":
        path.write_text('{"name": "broken", "model": ')
        words = ["line 1"]
    else:
        patch, words = MALFORMED[case]
        doc = instance_doc(name, tiny_model, free_port(), fake_binary)
        doc.update({k: v for k, v in patch.items() if k != "name"})
        if patch.get("model", "") is None:
            doc.pop("model")
        if case == "unknown-field":
            doc["model"] = {"path": str(tiny_model), "contex_size": 10}
        if case == "bad-name":
            doc["name"] = "Bad_Name"
        path.write_text(json.dumps(doc))
    before = path.read_bytes()
    for command in (["config", "validate", name], ["up", name, "-d"]):
        result = cli.run(*command)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        output = result.stdout + result.stderr
        for word in words:
            assert word in output, (command, word, output)
    assert path.read_bytes() == before, "a refused config must be left exactly as it was"
    assert not any(
        "fake_server" in " ".join(p.info["cmdline"] or []) and str(cli.home) in " ".join(p.info["cmdline"] or [])
        for p in psutil.process_iter(["cmdline"])
    )
    assert not (cli.home / "logs" / name / "stderr.log").exists()


def test_validate_reports_duplicate_ports_and_missing_files(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    cli.write_config("a", instance_doc("a", tiny_model, port, tmp_path / "no-binary"))
    cli.write_config("b", instance_doc("b", tmp_path / "missing.gguf", port, tmp_path / "no-binary"))
    result = cli.run("config", "validate", "--json")
    assert result.returncode == 1
    reports = {r["name"]: r for r in json.loads(result.stdout)}
    assert any("also used by b" in e for e in reports["a"]["errors"])
    assert any("missing.gguf" in e for e in reports["b"]["errors"])
    assert all(any(e.startswith("binary:") for e in r["errors"]) for r in reports.values())


def test_validate_passes_and_lint_warns_on_old_spellings(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    doc = instance_doc("seedy", tiny_model, free_port(), fake_binary)
    doc["health"] = {"interval_seconds": 5, "timeout_seconds": 2, "max_failures": 2}
    doc.pop("healthcheck")
    cli.write_config("seedy", doc)
    assert cli.run("config", "validate", "seedy").returncode == 0
    lint = cli.run("config", "lint", "seedy")
    assert lint.returncode == 0 and "old spelling" in lint.stdout


def test_schema_is_json_schema_with_the_seed_schema_key(cli: Cli) -> None:
    schema = json.loads(cli.run("config", "schema", check=True).stdout)
    assert schema["type"] == "object" and "$schema" in schema["properties"]
    assert schema["properties"]["name"]["pattern"].startswith("^[a-z0-9]")
