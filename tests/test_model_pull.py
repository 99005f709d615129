"""`models pull|list|register|catalog|unregister|rm` and `init --model hf.co/...` against the project's fake Hub (a
real HTTP server speaking what ``huggingface_hub`` calls), run as a user runs the installed CLI, with HF_ENDPOINT."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Cli, _cli_command
from helpers import free_port, subprocess_env, wait_until
from llama_orchestrator.testing.fake_hub import FakeHub

REPO = "me/tiny-GGUF"
pytestmark = pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script; SIGKILL")


@pytest.fixture
def hub(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    data = tiny_model.read_bytes()
    server = FakeHub()
    # Q8_0 differs from Q4_K_M by a trailing byte (a GGUF reader ignores it), so the two have different checksums.
    server.add(REPO, {"tiny-Q4_K_M.gguf": data, "tiny-Q8_0.gguf": data + b"\0", "README.md": b"# tiny\n"})
    server.add(
        "me/split-GGUF",
        {"big-Q4_K_M-00001-of-00002.gguf": data[:200_000], "big-Q4_K_M-00002-of-00002.gguf": data[200_000:]},
    )
    server.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # never the user's own token or cache
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield server
    server.stop()


def pulled(home: Path, name: str) -> Path:
    return home / "models" / "hf" / "me" / "tiny-GGUF" / name


def test_pull_brings_the_chosen_quant_and_list_shows_it(cli: Cli, hub: FakeHub, home: Path) -> None:
    result = cli.run("models", "pull", f"{REPO}:q8_0")  # case-insensitive, as llama.cpp's -hf
    assert result.returncode == 0, result.stderr
    assert "hf.co/me/tiny-GGUF:Q8_0: downloaded 1 file(s)" in result.stdout
    assert "tiny-Q8_0.gguf" in result.stderr  # the progress bar (rich, on stderr)
    target = pulled(home, "tiny-Q8_0.gguf")
    assert target.read_bytes() == hub.repos[REPO].files["tiny-Q8_0.gguf"]
    assert not pulled(home, "tiny-Q4_K_M.gguf").exists()
    assert [r.path for r in hub.requests if r.method == "GET" and "/resolve/" in r.path][-1].endswith("tiny-Q8_0.gguf")
    rows = {r["path"]: r for r in cli.json("models", "list")}
    row = rows[str(target)]
    assert row["reference"] == "hf.co/me/tiny-GGUF:Q8_0"
    assert row["architecture"] == "llama" and row["context_length"] == 512
    assert row["size_bytes"] == target.stat().st_size
    assert row["default_context"] == 512 and row["estimated_memory_mb"] > 0
    assert not any("/.partial/" in path for path in rows)

    again = cli.run("models", "pull", f"hf.co/{REPO}:Q8_0", "--json", check=True)
    assert json.loads(again.stdout)["downloaded"] == []  # already there: nothing fetched
    assert len(hub.downloads("tiny-Q8_0.gguf")) == 1


def test_pull_without_quant_takes_q4_k_m(cli: Cli, hub: FakeHub, home: Path) -> None:
    cli.run("models", "pull", REPO, check=True)
    assert pulled(home, "tiny-Q4_K_M.gguf").is_file()


def test_unknown_quant_lists_the_choices(cli: Cli, hub: FakeHub, home: Path) -> None:
    result = cli.run("models", "pull", f"{REPO}:Q2_K")
    assert result.returncode == 3
    assert "no Q2_K file" in result.stderr and "tiny-Q8_0.gguf (:Q8_0)" in result.stderr
    assert "tiny-Q4_K_M.gguf (:Q4_K_M)" in result.stderr
    assert not (home / "models" / "hf").exists()


def test_split_model_brings_every_part(cli: Cli, hub: FakeHub, home: Path, tiny_model: Path) -> None:
    result = cli.run("models", "pull", "me/split-GGUF", "--json", check=True)
    out = json.loads(result.stdout)
    folder = home / "models" / "hf" / "me" / "split-GGUF"
    assert out["path"] == str(folder / "big-Q4_K_M-00001-of-00002.gguf")
    assert sorted(out["downloaded"]) == ["big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf"]
    joined = (folder / "big-Q4_K_M-00001-of-00002.gguf").read_bytes() + (
        folder / "big-Q4_K_M-00002-of-00002.gguf"
    ).read_bytes()
    assert joined == tiny_model.read_bytes()
    rows = [r for r in cli.json("models", "list") if "split-GGUF" in r["path"]]
    assert [r["file"] for r in rows] == ["big-Q4_K_M-00001-of-00002.gguf"]  # one model, its parts summed
    assert rows[0]["size_bytes"] == len(joined)


def test_checksum_mismatch_installs_nothing(cli: Cli, hub: FakeHub, home: Path) -> None:
    hub.wrong_sha.add("tiny-Q8_0.gguf")
    result = cli.run("models", "pull", f"{REPO}:Q8_0")
    assert result.returncode == 1
    assert "checksum mismatch" in result.stderr and "nothing was installed" in result.stderr
    assert not pulled(home, "tiny-Q8_0.gguf").exists()
    assert not list((home / "models").rglob("*.gguf"))
    assert cli.json("models", "list") == []


def test_no_disk_space_is_refused_before_the_first_byte(cli: Cli, hub: FakeHub, home: Path) -> None:
    hub.advertised_size["tiny-Q8_0.gguf"] = 2**60  # an exabyte: no disk has it
    result = cli.run("models", "pull", f"{REPO}:Q8_0")
    assert result.returncode == 1
    assert "not enough disk space" in result.stderr and "nothing was downloaded" in result.stderr
    assert hub.downloads("tiny-Q8_0.gguf") == []
    assert not list((home / "models").rglob("*.gguf"))


def test_no_network_and_unknown_repo_are_clear_errors(
    cli: Cli, hub: FakeHub, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unknown = cli.run("models", "pull", "me/nope-GGUF:Q8_0")
    assert unknown.returncode == 1
    assert "no model repository 'me/nope-GGUF'" in unknown.stderr and hub.url in unknown.stderr

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    offline = cli.run("models", "pull", f"{REPO}:Q8_0")
    assert offline.returncode == 1
    assert "cannot reach the Hub" in offline.stderr
    assert "Traceback" not in offline.stderr
    assert not (home / "models" / "hf").exists()


def test_hf_token_is_sent(cli: Cli, hub: FakeHub, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.required_token = "hf_secret_test_token"
    refused = cli.run("models", "pull", f"{REPO}:Q8_0")
    assert refused.returncode == 1 and "HF_TOKEN" in refused.stderr
    # A saved `hf auth login` (the token file in HF_HOME) is used...
    (Path(os.environ["HF_HOME"])).mkdir(parents=True, exist_ok=True)
    (Path(os.environ["HF_HOME"]) / "token").write_text("hf_secret_test_token")
    cli.run("models", "pull", f"{REPO}:Q8_0", check=True)
    assert hub.downloads("tiny-Q8_0.gguf")[-1].authorization == "Bearer hf_secret_test_token"
    # ... and HF_TOKEN wins over it.
    (Path(os.environ["HF_HOME"]) / "token").write_text("hf_stale_token")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_test_token")
    cli.run("models", "pull", f"{REPO}:Q4_K_M", check=True)
    assert pulled(home, "tiny-Q4_K_M.gguf").is_file()
    assert hub.downloads("tiny-Q4_K_M.gguf")[-1].authorization == "Bearer hf_secret_test_token"


def test_a_pull_killed_half_way_transfers_only_the_rest(cli: Cli, hub: FakeHub, home: Path) -> None:
    # 3 MiB, cut after 2: the client writes every MiB (adapters.hub.CHUNK_BYTES), so 2 MiB are on disk at the kill.
    name, mib = "blob-Q8_0.gguf", 1024 * 1024
    hub.add("me/big-GGUF", {name: os.urandom(3 * mib)})
    hub.stall_after[name] = 2 * mib
    env = subprocess_env({"LLAMA_ORCH_HOME": str(home), "LLAMA_ORCH_NO_DAEMON": "1", "NO_COLOR": "1"})
    first = subprocess.Popen(
        [*_cli_command(), "models", "pull", "me/big-GGUF:Q8_0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    partial = home / "models" / ".partial"

    def two_mib_on_disk() -> list[Path]:
        return [p for p in partial.rglob("*.incomplete") if p.stat().st_size == 2 * mib]

    try:
        incomplete = wait_until(two_mib_on_disk, timeout=60, message="2 MiB of the file on disk")[0]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    folder = home / "models" / "hf" / "me" / "big-GGUF"
    assert not (folder / name).exists()  # nothing where a model is expected
    assert cli.json("models", "list") == []  # a download in progress is not a model
    del hub.stall_after[name]
    hub.release()

    result = cli.run("models", "pull", "me/big-GGUF:Q8_0", "--json", check=True)
    assert json.loads(result.stdout)["bytes_fetched"] == mib
    assert hub.downloads(name)[-1].range == f"bytes={2 * mib}-"  # only the rest was asked for
    assert len(hub.downloads(name)) == 2
    data = (folder / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(hub.repos["me/big-GGUF"].files[name]).hexdigest()
    assert not incomplete.exists()
    assert not partial.exists()  # the staging folder is cleaned once nothing is in progress


def test_catalog_register_pull_unregister(cli: Cli, hub: FakeHub, home: Path) -> None:
    cli.run("models", "register", "tiny", "--repo", f"{REPO}:Q8_0", "--name", "Tiny test model", check=True)
    assert (home / "models" / "catalog.json").stat().st_mode & 0o077 == 0  # private
    rows = cli.json("models", "catalog")
    assert rows == [
        {
            "id": "tiny",
            "name": "Tiny test model",
            "repo": f"{REPO}:Q8_0",
            "downloaded": False,
            "path": None,
            "size_bytes": None,
        }
    ]
    table = cli.run("models", "catalog", check=True).stdout
    assert "ID" in table and "DOWNLOADED" in table and "Tiny test model" in table
    cli.run("models", "pull", "tiny", check=True)
    row = cli.json("models", "catalog")[0]
    assert row["downloaded"] is True and row["size_bytes"] == pulled(home, "tiny-Q8_0.gguf").stat().st_size
    assert cli.run("models", "register", "Bad/Id", "--repo", REPO).returncode == 2
    cli.run("models", "unregister", "tiny", check=True)
    assert cli.json("models", "catalog") == []
    assert pulled(home, "tiny-Q8_0.gguf").is_file()  # unregister keeps the files
    assert cli.run("models", "unregister", "tiny").returncode == 3


def test_init_pulls_and_rm_refuses_while_used(cli: Cli, hub: FakeHub, home: Path, fake_binary: Path) -> None:
    result = cli.run(
        "init", "tiny", "--model", f"hf.co/{REPO}:Q8_0", "--binary", str(fake_binary), "--port", str(free_port())
    )
    assert result.returncode == 0, result.stderr
    assert "context 512 tokens (trained: 512)" in result.stdout
    config = json.loads((home / "instances" / "tiny" / "config.json").read_text())
    assert config["model"] == {
        "path": str(pulled(home, "tiny-Q8_0.gguf")),
        "context_size": 512,
        "batch_size": 512,
        "source": f"hf.co/{REPO}:Q8_0",
    }
    row = {r["path"]: r for r in cli.json("models", "list")}[config["model"]["path"]]
    assert row["used_by"] == ["tiny"]

    refused = cli.run("models", "rm", f"hf.co/{REPO}:Q8_0")
    assert refused.returncode == 1
    assert "used by instance(s) tiny" in refused.stderr
    assert pulled(home, "tiny-Q8_0.gguf").is_file()

    cli.run("init", "second", "--model", f"{REPO}:Q8_0", "--binary", str(fake_binary), check=True)
    assert len(hub.downloads("tiny-Q8_0.gguf")) == 1  # already pulled: not fetched again

    cli.run("rm", "tiny", check=True)
    cli.run("rm", "second", check=True)
    removed = cli.run("models", "rm", f"{REPO}:Q8_0", check=True)
    assert "deleted" in removed.stdout
    assert not pulled(home, "tiny-Q8_0.gguf").exists()
    assert cli.run("models", "rm", f"{REPO}:Q8_0").returncode == 3


def test_init_by_catalog_id(cli: Cli, hub: FakeHub, home: Path, fake_binary: Path) -> None:
    cli.run("models", "register", "tiny-q4", "--repo", REPO, check=True)
    cli.run("init", "one", "--model", "tiny-q4", "--binary", str(fake_binary), check=True)
    config = json.loads((home / "instances" / "one" / "config.json").read_text())
    assert config["model"]["path"] == str(pulled(home, "tiny-Q4_K_M.gguf"))
    assert config["model"]["source"] == "tiny-q4"


def test_init_warns_when_the_estimate_does_not_fit(cli: Cli, home: Path, tiny_model: Path, fake_binary: Path) -> None:
    # A memory budget smaller than the smallest context: the context is the minimum, and init says so.
    (home / "orchestrator.json").write_text(json.dumps({"router": {"memory_budget_mb": 1}}))
    os.chmod(home / "orchestrator.json", 0o600)
    result = cli.run("init", "small", "--model", str(tiny_model), "--binary", str(fake_binary))
    assert result.returncode == 0, result.stderr
    assert json.loads((home / "instances" / "small" / "config.json").read_text())["model"]["context_size"] == 512
    assert "warning:" in result.stderr and "is more than the memory available (1 MiB" in result.stderr


@pytest.mark.real_server
def test_acceptance_pull_init_up_real_server(cli: Cli, hub: FakeHub, home: Path, real_binary: Path) -> None:
    cli.run("models", "pull", f"{REPO}:Q8_0", check=True)
    listed = cli.json("models", "list")
    assert [r["path"] for r in listed] == [str(pulled(home, "tiny-Q8_0.gguf"))]
    port = free_port()
    cli.run(
        "init", "tiny", "--model", f"hf.co/{REPO}:Q8_0", "--binary", str(real_binary), "--port", str(port), check=True
    )
    try:
        up = cli.run("up", "tiny", "-d", "--wait", "--timeout", "90")
        assert up.returncode == 0, up.stdout + up.stderr
        assert cli.ps()["tiny"]["health"] == "healthy"
        refused = cli.run("models", "rm", f"{REPO}:Q8_0")
        assert refused.returncode == 1 and "tiny" in refused.stderr
    finally:
        cli.run("down", "tiny")


def test_daemon_api_lists_pulls_with_progress_and_removes(
    cli: Cli, hub: FakeHub, home: Path, fake_binary: Path
) -> None:
    from test_api import start_daemon

    daemon = start_daemon(cli)  # HF_ENDPOINT reaches it through the environment, as for a user's daemon
    try:
        with daemon.client() as api:
            with api.stream("POST", "/api/models/pull", json={"reference": f"hf.co/{REPO}:Q8_0"}) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("application/x-ndjson")
                events = [json.loads(line) for line in response.iter_lines() if line]
            size = len(hub.repos[REPO].files["tiny-Q8_0.gguf"])
            assert events[0] == {"event": "plan", "files": [{"name": "tiny-Q8_0.gguf", "size": size}]}
            progress = [e for e in events if e["event"] == "progress"]
            assert progress and progress[-1]["done"] == size == progress[-1]["total"]
            assert events[-1]["event"] == "done" and events[-1]["path"] == str(pulled(home, "tiny-Q8_0.gguf"))

            listed = {r["path"]: r for r in api.get("/api/models").json()}
            assert listed[str(pulled(home, "tiny-Q8_0.gguf"))]["reference"] == f"hf.co/{REPO}:Q8_0"

            with api.stream("POST", "/api/models/pull", json={"reference": "me/nope-GGUF"}) as response:
                failed = [json.loads(line) for line in response.iter_lines() if line]
            assert failed[-1]["event"] == "error" and "no model repository" in failed[-1]["message"]
            assert api.post("/api/models/pull", json={"reference": "no-such-id"}).status_code == 404
            assert api.post("/api/models/pull", json={"reference": "a/b/c"}).status_code == 400

            # The CLI with --host: the node's daemon pulls (progress bars from its events), lists and removes.
            remote = cli.run("--host", daemon.url, "models", "pull", f"{REPO}:Q4_K_M", "--json", check=True)
            assert json.loads(remote.stdout)["path"] == str(pulled(home, "tiny-Q4_K_M.gguf"))
            assert "tiny-Q4_K_M.gguf" in remote.stderr
            remote_rows = json.loads(cli.run("--host", daemon.url, "models", "list", "--json", check=True).stdout)
            assert str(pulled(home, "tiny-Q4_K_M.gguf")) in [r["path"] for r in remote_rows]
            unknown = cli.run("--host", daemon.url, "models", "pull", "me/nope-GGUF")
            assert unknown.returncode == 1 and "no model repository" in unknown.stderr
            cli.run("--host", daemon.url, "models", "rm", f"{REPO}:Q4_K_M", check=True)
            assert not pulled(home, "tiny-Q4_K_M.gguf").exists()

            cli.write_config(
                "user",
                {"name": "user", "model": {"path": str(pulled(home, "tiny-Q8_0.gguf"))}, "binary": str(fake_binary)},
            )
            refused = api.post("/api/models/remove", json={"reference": f"{REPO}:Q8_0"})
            assert refused.status_code == 409 and "user" in refused.json()["error"]["message"]
            refused_cli = cli.run("--host", daemon.url, "models", "rm", f"{REPO}:Q8_0")
            assert refused_cli.returncode == 1 and "used by instance(s) user" in refused_cli.stderr
            (home / "instances" / "user" / "config.json").unlink()
            removed = api.post("/api/models/remove", json={"reference": f"{REPO}:Q8_0"})
            assert removed.status_code == 200 and removed.json()["deleted"] == [str(pulled(home, "tiny-Q8_0.gguf"))]
            assert not pulled(home, "tiny-Q8_0.gguf").exists()
    finally:
        cli.run("daemon", "stop", timeout=60)
