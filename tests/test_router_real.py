"""The router in front of the real llama-server, driven by the official `openai` client (what users point at it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import OpenAI

from conftest import Cli, instance_doc
from helpers import free_port, wait_until
from test_router import Served, serve  # noqa: F401 - the fixture, shared

pytestmark = pytest.mark.real_server


def add_real(cli: Cli, tiny_model: Path, real_binary: Path, name: str, **extra: object) -> None:
    # --alias makes llama-server put this name in its answers' "model": proof of which server answered.
    cli.write_config(name, instance_doc(name, tiny_model, free_port(), real_binary, args=["--alias", name], **extra))


def client_for(served: Served) -> OpenAI:
    return OpenAI(base_url=served.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def test_openai_client_lists_streams_on_demand_and_ttl_unloads(cli, tiny_model, real_binary, serve) -> None:
    for name in ("tiny-a", "tiny-b"):
        add_real(cli, tiny_model, real_binary, name, ttl=2)
    served = serve()
    client = client_for(served)
    assert sorted(m.id for m in client.models.list()) == ["tiny-a", "tiny-b"]
    assert served.running() == set()

    for name in ("tiny-a", "tiny-b"):
        stream = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True)
        chunks = list(stream)
        assert chunks and {c.model for c in chunks} == {name}
        assert any(c.choices and c.choices[0].delta.content for c in chunks)
        assert any(c.choices and c.choices[0].finish_reason for c in chunks)
        assert served.status(name) == "running"
        # The client may hang up on reading [DONE], before the router has finished its books.
        stats = wait_until(lambda n=name: (s := served.stats(n)).in_flight == 0 and s, 5)
        assert stats.starts_total == 1 and stats.requests_total == {200: 1}
        assert stats.completion_tokens_total > 0 and stats.last_tokens_per_second > 0  # from the final chunk

    wait_until(lambda: served.running() == set(), 30, message="both unloaded after their ttl")


def test_openai_client_max_loaded_one_alternating(cli, tiny_model, real_binary, serve) -> None:
    for name in ("tiny-a", "tiny-b"):
        add_real(cli, tiny_model, real_binary, name)
    served = serve(max_loaded=1)
    client = client_for(served)
    for name in ["tiny-a", "tiny-b", "tiny-a", "tiny-b"]:
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.model == name and reply.choices[0].message.role == "assistant"
        assert reply.usage.completion_tokens > 0
        assert served.running() == {name}
    completion = client.completions.create(model="tiny-a", prompt="once upon", max_tokens=3)
    assert completion.model == "tiny-a" and completion.choices[0].text is not None
    assert served.running() == {"tiny-a"}
