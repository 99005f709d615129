"""``orchestrator.json``: an unknown key is reported with the settings' own fields, never an instance config's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_orchestrator.adapters.config_files import load_settings
from llama_orchestrator.domain.errors import ConfigError


def problems(tmp_path: Path, document: dict) -> str:
    path = tmp_path / "orchestrator.json"
    path.write_text(json.dumps(document))
    path.chmod(0o600)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return str(caught.value)


def test_an_unknown_top_level_key_lists_the_settings_fields(tmp_path: Path) -> None:
    text = problems(tmp_path, {"xyzzy": ["http://b:8000"]})  # (`peers` became a field: issue 12)
    assert "xyzzy" in text and "unknown field" in text
    assert "allowed fields are" in text and "api" in text and "router" in text and "reload" in text
    assert "context_size" not in text and "model" not in text.replace("model_", "")  # instance fields


def test_a_near_miss_gets_the_settings_field_suggested(tmp_path: Path) -> None:
    assert "did you mean 'router'" in problems(tmp_path, {"routr": {}})
    assert "did you mean 'port'" in problems(tmp_path, {"api": {"prot": 8000}})
