"""The router in front of the real llama-server, driven by the official `openai` client (what users point at it).

The model has random weights, so what it samples is noise (a test that asserted "some token decodes to visible
text" failed in 2 of 10 runs). Every request here is deterministic: greedy (temperature 0, top_k 1, a fixed seed),
``ignore_eos`` (exactly ``max_tokens`` tokens, finish_reason "length") and a logit bias that makes the byte "a" the
greedy choice, so the text is known before the weights are: the tests assert framing, models, counts, finish
reasons and that exact text.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import OpenAI

from conftest import Cli, instance_doc
from helpers import free_port, wait_until
from test_router import Served, serve_fixture

pytestmark = pytest.mark.real_server
SHARED_FIXTURES = (serve_fixture,)  # the `serve` fixture, shared: named here so the import stays


def add_real(cli: Cli, tiny_model: Path, real_binary: Path, name: str, **extra: object) -> None:
    # --alias makes llama-server put this name in its answers' "model": proof of which server answered.
    cli.write_config(name, instance_doc(name, tiny_model, free_port(), real_binary, args=["--alias", name], **extra))


# The tiny model's vocabulary (testing/tiny_gguf.py): <unk>, <s>, </s>, then the byte tokens <0x00>..<0xFF>.
LETTER_A = 3 + ord("a")
# Greedy and bounded: the same request gives the same tokens, and always exactly max_tokens of them. The bias makes
# greedy pick the byte "a" whatever the random weights say: visible text by construction, not by luck (left to
# the weights, greedy picked bytes that are no valid UTF-8, and llama-server streamed no content at all).
DETERMINISTIC = {
    "temperature": 0,
    "seed": 42,
    "extra_body": {"top_k": 1, "ignore_eos": True, "logit_bias": [[LETTER_A, 100]]},
}


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
            model=name, messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True, **DETERMINISTIC
        )
        chunks = list(stream)
        assert chunks and {c.model for c in chunks} == {name}
        with_choices = [c for c in chunks if c.choices]
        pieces = [c.choices[0].delta.content for c in with_choices if c.choices[0].delta.content]
        assert pieces == ["a"] * 8  # one chunk per token, relayed as they come, not one buffered answer
        assert [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason] == ["length"]
        assert served.status(name) == "running"
        # The client may hang up on reading [DONE], before the router has finished its books.
        stats = wait_until(lambda n=name: (s := served.stats(n)).in_flight == 0 and s, 5)
        assert stats.starts_total == 1 and stats.requests_total == {200: 1}
        assert stats.completion_tokens_total == 8 and stats.last_tokens_per_second > 0  # from the final chunk

    wait_until(lambda: served.running() == set(), 30, message="both unloaded after their ttl")


def test_openai_client_max_loaded_one_alternating(cli, tiny_model, real_binary, serve) -> None:
    for name in ("tiny-a", "tiny-b"):
        add_real(cli, tiny_model, real_binary, name)
    served = serve(max_loaded=1)
    client = client_for(served)
    contents: dict[str, list[str | None]] = {"tiny-a": [], "tiny-b": []}
    for name in ["tiny-a", "tiny-b", "tiny-a", "tiny-b"]:
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4, **DETERMINISTIC
        )
        assert reply.model == name and reply.choices[0].message.role == "assistant"
        assert reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"
        assert served.running() == {name}
        contents[name].append(reply.choices[0].message.content)
    # Each answer came from a freshly started server (max_loaded 1), each the same deterministic text.
    assert contents == {"tiny-a": ["aaaa", "aaaa"], "tiny-b": ["aaaa", "aaaa"]}
    completion = client.completions.create(model="tiny-a", prompt="once upon", max_tokens=3, **DETERMINISTIC)
    assert completion.model == "tiny-a" and completion.choices[0].text == "aaa"
    assert completion.usage.completion_tokens == 3 and completion.choices[0].finish_reason == "length"
    assert served.running() == {"tiny-a"}
