"""adapters.http_relay and services.upstream.LeanUpstream: the router's lean upstream client, against scripted
upstreams on real sockets (asyncio servers in the test's own loop, asyncio's and uvloop's)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from llama_orchestrator.adapters.http_relay import (
    ClientGone,
    ConnectFailed,
    ConnectionPool,
    UpstreamClosed,
)
from llama_orchestrator.services.upstream import LeanUpstream, lean_request

LOOPS = pytest.mark.parametrize(
    "loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def run(loop_factory, main: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(asyncio.wait_for(main(), 30))


async def serve(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    return head + await reader.readexactly(length)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def until(predicate: Callable[[], bool], within_s: float, what: str) -> None:
    """Wait on a condition with a deadline (the loop keeps running meanwhile)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not in {within_s} s: {what}")
        await asyncio.sleep(0.005)


class Sink:
    """A client's connection as the relay sees it (ChunkWriter's push/drain/gone), with a switch for slowness."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.size = 0
        self.slow = False
        self.left = False
        self.writable = asyncio.Event()

    def push(self, piece: bytes) -> bool:
        self.pieces.append(piece)
        self.size += len(piece)
        return self.slow or self.left

    async def drain(self) -> None:
        await self.writable.wait()

    def gone(self) -> bool:
        return self.left


def request(port: int, body: bytes = b"{}") -> bytes:
    return lean_request("POST", "/v1/chat/completions", f"127.0.0.1:{port}", [], [], body)


@LOOPS
def test_a_client_that_leaves_mid_stream_closes_the_upstream_connection(loop_factory) -> None:
    async def main() -> None:
        upstream_closed = asyncio.Event()

        async def endless(reader, writer) -> None:
            await read_request(reader)
            writer.write(STREAM_HEAD)

            async def generate() -> None:
                while True:
                    writer.write(chunk(b'data: {"delta": "x"}\n\n'))
                    await asyncio.sleep(0.005)

            generating = asyncio.ensure_future(generate())
            with contextlib.suppress(ConnectionError):  # as llama-server: generates until its connection closes
                await reader.read()
            generating.cancel()
            upstream_closed.set()

        server, port = await serve(endless)
        pool = ConnectionPool("127.0.0.1", port)
        conn = await pool.exchange(request(port))
        sink = Sink()
        relaying = asyncio.ensure_future(conn.relay(sink.push, sink.drain, sink.gone))
        await until(lambda: len(sink.pieces) >= 3, 5, "three pieces relayed")
        sink.left = True
        with pytest.raises(ClientGone):
            await relaying  # at the next piece, not at the stream's end
        conn.abort()  # what LeanUpstream.close does for an answer not complete
        await asyncio.wait_for(upstream_closed.wait(), 5)
        assert pool.idle == 0
        server.close()

    run(loop_factory, main)


@LOOPS
def test_a_slow_client_pauses_the_upstream_instead_of_buffering(loop_factory) -> None:
    total = 32 * 1024 * 1024
    piece = b"d" * 65536

    async def main() -> None:
        backed_up = asyncio.Event()

        async def firehose(reader, writer) -> None:
            await read_request(reader)
            writer.write(STREAM_HEAD)
            for _ in range(total // len(piece)):
                writer.write(chunk(piece))
                if writer.transport.get_write_buffer_size() > 0:
                    backed_up.set()  # the kernel took only part of it: the sockets' buffers are full
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

        server, port = await serve(firehose)
        pool = ConnectionPool("127.0.0.1", port)
        conn = await pool.exchange(request(port))
        sink = Sink()
        sink.slow = True  # the client's transport is paused from the first piece on
        relaying = asyncio.ensure_future(conn.relay(sink.push, sink.drain, sink.gone))
        await asyncio.wait_for(backed_up.wait(), 10)  # the instance cannot write on
        held = sink.size
        assert held < 16 * 1024 * 1024  # what we took in while the client read nothing: bounded by the sockets
        await asyncio.sleep(0.05)  # a while more (not a synchronisation): nothing more may come in meanwhile
        assert sink.size - held <= 4 * len(piece)
        sink.slow = False
        sink.writable.set()
        await relaying
        assert sink.size == total and conn.complete
        conn.finish()
        server.close()

    run(loop_factory, main)


@LOOPS
def test_an_upstream_torn_mid_chunk_fails_the_relay_instead_of_hanging(loop_factory) -> None:
    async def main() -> None:
        async def torn(reader, writer) -> None:
            await read_request(reader)
            writer.write(STREAM_HEAD + chunk(b"data: one\n\n") + b"100\r\ndata: tw")  # 256 bytes announced
            await writer.drain()
            writer.transport.abort()

        server, port = await serve(torn)
        pool = ConnectionPool("127.0.0.1", port)
        conn = await pool.exchange(request(port))
        sink = Sink()
        with pytest.raises(UpstreamClosed):
            await asyncio.wait_for(conn.relay(sink.push, sink.drain, sink.gone), 5)
        assert sink.pieces[0] == b"data: one\n\n"
        conn.abort()
        server.close()

    run(loop_factory, main)


@LOOPS
def test_tokens_are_counted_from_the_final_chunk_and_time_to_first_token_kept(loop_factory) -> None:
    usage = {"completion_tokens": 40, "prompt_tokens": 7}
    timings = {"predicted_per_second": 123.5, "predicted_n": 40}

    async def main() -> None:
        async def stream(reader, writer) -> None:
            await read_request(reader)
            writer.write(STREAM_HEAD)
            for i in range(40):  # token events mention no usage: none of them is parsed
                writer.write(chunk(b'data: {"choices": [{"delta": {"content": "t%d"}}]}\n\n' % i))
            final = {"choices": [{"delta": {}, "finish_reason": "length"}], "usage": usage, "timings": timings}
            writer.write(chunk(b"data: " + json.dumps(final).encode() + b"\n\n") + chunk(b"data: [DONE]\n\n"))
            writer.write(b"0\r\n\r\n")
            await writer.drain()

        server, port = await serve(stream)
        now = [100.0]
        pool = ConnectionPool("127.0.0.1", port, clock=lambda: now[0])
        conn = await pool.exchange(request(port))
        finished: list = []
        upstream = LeanUpstream(conn, "alpha", 99.5, lambda: now[0], lambda *a: finished.append(a))
        assert upstream.event_stream and not upstream.small and upstream.status == 200
        assert (b"x-llama-orch-instance", b"alpha") in upstream.headers
        assert all(k != b"transfer-encoding" for k, _ in upstream.headers)
        sink = Sink()
        await upstream.relay(None, sink)  # type: ignore[arg-type]
        now[0] = 102.0
        await upstream.close()
        ((status, tokens),) = finished
        assert status == 200
        assert (tokens.completion_tokens, tokens.prompt_tokens, tokens.tokens_per_second) == (40, 7, 123.5)
        assert upstream.time_to_first_token == pytest.approx(0.5)
        assert b"".join(sink.pieces).endswith(b"data: [DONE]\n\n")
        server.close()

    run(loop_factory, main)


@LOOPS
def test_small_answers_reuse_one_connection_and_a_closed_one_is_replaced(loop_factory) -> None:
    async def main() -> None:
        connections: list[asyncio.StreamWriter] = []

        async def keep_alive(reader, writer) -> None:
            connections.append(writer)
            try:
                while True:
                    body = await read_request(reader)
                    assert b"content-length: 2\r\n" in body and body.endswith(b"{}")
                    answer = b'{"usage": {"completion_tokens": 1}}'
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                        % (len(answer), answer)
                    )
                    await writer.drain()
            except asyncio.IncompleteReadError:
                writer.close()

        server, port = await serve(keep_alive)
        pool = ConnectionPool("127.0.0.1", port)
        for _ in range(3):
            conn = await pool.exchange(request(port))
            finished: list = []
            upstream = LeanUpstream(conn, "alpha", 0.0, lambda: 1.0, lambda *a, into=finished: into.append(a))
            assert upstream.small
            assert json.loads(await upstream.read()) == {"usage": {"completion_tokens": 1}}
            await upstream.close()
            assert finished[0][0] == 200 and finished[0][1].completion_tokens == 1
        assert len(connections) == 1 and pool.idle == 1
        connections[0].transport.abort()  # the instance drops the idle connection
        await until(lambda: pool.idle == 0, 5, "the pool notices the closed connection")
        conn = await pool.exchange(request(port))
        assert conn.status == 200 and len(connections) == 2
        conn.abort()
        pool.close()
        server.close()

    run(loop_factory, main)


@LOOPS
def test_no_listener_is_connect_failed_and_a_silent_close_is_upstream_closed(loop_factory) -> None:
    async def main() -> None:
        async def hang_up(reader, writer) -> None:
            await read_request(reader)
            writer.transport.abort()

        server, port = await serve(hang_up)
        with pytest.raises(UpstreamClosed):
            await ConnectionPool("127.0.0.1", port).exchange(request(port))
        server.close()
        await server.wait_closed()
        with pytest.raises(ConnectFailed):
            await ConnectionPool("127.0.0.1", port).exchange(request(port))

    run(loop_factory, main)


def test_the_request_drops_hop_headers_and_the_clients_key_and_adds_the_instances() -> None:
    headers = [(b"Authorization", b"Bearer ours"), (b"Connection", b"keep-alive"), (b"X-Trace", b"7")]
    sent = lean_request("POST", "/v1/x?a=1", "127.0.0.1:9", headers, ["--api-key", "theirs"], b"{}")
    head, _, body = sent.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/x?a=1 HTTP/1.1" and body == b"{}"
    assert set(lines[1:]) == {
        b"host: 127.0.0.1:9",
        b"x-trace: 7",
        b"authorization: Bearer theirs",
        b"accept-encoding: identity",
        b"content-length: 2",
    }
