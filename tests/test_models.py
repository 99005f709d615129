"""`models list`: GGUF files named by configs and found in the models folder, with metadata and their users."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llama_orchestrator.adapters.home import Home
from llama_orchestrator.domain.errors import NotFoundError
from llama_orchestrator.services.models import list_models


def write_config(home: Home, name: str, model_path: str) -> None:
    path = home.config_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": name, "model": {"path": model_path}}))


@pytest.fixture
def stocked_home(tmp_path: Path, tiny_model: Path) -> Home:
    """models/sub/tiny.gguf used by two instances (one by a seed-style relative path), a file that is not GGUF,
    a config naming a missing file, and a broken config."""
    home = Home(tmp_path / "home")
    folder = home.root / "models" / "sub"
    folder.mkdir(parents=True)
    shutil.copy(tiny_model, folder / "tiny.gguf")
    (home.root / "models" / "notes.GGUF").write_text("not a model")
    (home.root / "models" / "readme.txt").write_text("ignored")
    write_config(home, "alpha", "../../models/sub/tiny.gguf")
    write_config(home, "beta", str(folder / "tiny.gguf"))
    write_config(home, "gamma", str(tmp_path / "elsewhere" / "gone.gguf"))
    home.config_path("broken").parent.mkdir(parents=True)
    home.config_path("broken").write_text("{not json")
    return home


def test_lists_folder_and_config_models_with_metadata_and_users(stocked_home, tmp_path):
    entries = {e.path.name: e.as_dict() for e in list_models(stocked_home)}
    assert set(entries) == {"tiny.gguf", "notes.GGUF", "gone.gguf"}
    tiny = entries["tiny.gguf"]
    assert tiny["used_by"] == ["alpha", "beta"]  # one file, whichever way the configs spell its path
    assert (tiny["architecture"], tiny["quantization"], tiny["context_length"]) == ("llama", "ALL_F32", 512)
    assert tiny["parameters"] > 0 and tiny["size_bytes"] == (stocked_home.root / "models/sub/tiny.gguf").stat().st_size
    assert tiny["in_folder"] and tiny["exists"] and tiny["error"] is None
    assert entries["notes.GGUF"]["error"].startswith("not a readable GGUF file")
    assert entries["notes.GGUF"]["used_by"] == []
    gone = entries["gone.gguf"]
    assert (gone["exists"], gone["in_folder"], gone["error"], gone["used_by"]) == (
        False,
        False,
        "file not found",
        ["gamma"],
    )


def test_another_folder_and_a_missing_one(stocked_home, tmp_path, tiny_model):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(tiny_model, other / "copy.gguf")
    # Sorted by path: elsewhere/gone.gguf, home/models/sub/tiny.gguf, other/copy.gguf; the default folder (and
    # its notes.GGUF) is not searched when another is given.
    assert [e.path.name for e in list_models(stocked_home, other)] == ["gone.gguf", "tiny.gguf", "copy.gguf"]
    assert [e.path.name for e in list_models(stocked_home, tmp_path / "nope")] == ["gone.gguf", "tiny.gguf"]
    with pytest.raises(NotFoundError, match="does not exist"):
        list_models(stocked_home, tmp_path / "nope", require_folder=True)


def test_an_empty_home_has_no_models(tmp_path):
    assert list_models(Home(tmp_path / "empty")) == []


def test_models_list_command(cli, tiny_model, tmp_path):
    folder = cli.home / "models"
    folder.mkdir()
    shutil.copy(tiny_model, folder / "tiny.gguf")
    cli.write_config("qwen", {"name": "qwen", "model": {"path": "../../models/tiny.gguf"}})
    [entry] = cli.json("models", "list")
    assert entry["path"] == str(folder / "tiny.gguf") and entry["used_by"] == ["qwen"]
    assert entry["architecture"] == "llama"
    table = cli.run("models", "list", check=True).stdout
    assert "tiny.gguf" in table and "llama" in table and "ALL_F32" in table and "qwen" in table
    assert " KB " in table  # the size, in people's units
    assert cli.run("models", "list", "--dir", str(tmp_path / "missing")).returncode == 3
    assert cli.json("models", "list", "--dir", str(tmp_path)) == [entry]  # found under tmp_path/home/models
