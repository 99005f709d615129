"""api.http_protocol.ChunkWriter: a stream's chunks written straight to the connection, framed as uvicorn frames
them, and only where uvicorn would frame them so (a chunked answer, after its start, not for HEAD)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from helpers import free_port, wait_until
from llama_orchestrator.api.http_protocol import CHUNK_WRITER, head_deadline_protocol

CHUNKS = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]
seen: dict[str, bool] = {}


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    writer = scope["extensions"][CHUNK_WRITER]
    seen["before start"] = writer.ready()
    headers = [(b"content-type", b"text/event-stream")]
    if scope["path"] == "/sized":
        headers.append((b"content-length", str(sum(map(len, CHUNKS))).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    seen[f"{scope['method']} {scope['path']}"] = writer.ready()
    if writer.ready():
        for chunk in CHUNKS:
            pending = writer.write(chunk)
            if pending is not None:
                await pending
    elif scope["method"] != "HEAD":
        await send({"type": "http.response.body", "body": b"".join(CHUNKS), "more_body": True})
    await send({"type": "http.response.body", "body": b""})
    seen["after end"] = writer.ready()


@pytest.fixture
def url() -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=head_deadline_protocol(5.0), lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 10, message="uvicorn did not start")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)


def test_chunks_written_directly_arrive_framed_and_the_connection_stays_usable(url: str) -> None:
    with httpx.Client() as client:
        for _ in range(2):  # the same keep-alive connection: the first answer ended cleanly
            with client.stream("GET", url + "/stream") as resp:
                assert resp.headers["transfer-encoding"] == "chunked"
                assert b"".join(resp.iter_raw()) == b"".join(CHUNKS)
    assert seen == {"before start": False, "GET /stream": True, "after end": False}


def test_not_ready_for_a_sized_answer_or_head(url: str) -> None:
    seen.clear()
    with httpx.Client() as client:
        assert client.get(url + "/sized").content == b"".join(CHUNKS)
        assert client.head(url + "/stream").status_code == 200
    assert seen["GET /sized"] is False
    assert seen["HEAD /stream"] is False


def test_a_uvicorn_cycle_of_another_shape_gets_no_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from llama_orchestrator.api.http_protocol import ChunkWriter

    monkeypatch.setattr(ChunkWriter, "_fits", None)  # judged again, for this cycle
    assert not ChunkWriter.fits(SimpleNamespace(response_started=True, transport=None))  # no flow, no framing state
    monkeypatch.setattr(ChunkWriter, "_fits", None)
    flow = SimpleNamespace(write_paused=False, drain=None)
    fields = dict.fromkeys(ChunkWriter._USES, None)
    assert ChunkWriter.fits(SimpleNamespace(**{**fields, "flow": flow}))
