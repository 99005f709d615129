"""The router's upstream connections: made without uvicorn's thread-pool resolve
(``adapters.http_relay.connect_socket``), and failing the way the router's retry and mark-down logic expects
(aiohttp.ClientConnectorError)."""

from __future__ import annotations

import asyncio
import errno
import socket

import aiohttp
import pytest
import uvloop

from llama_orchestrator.adapters.http_relay import connect_socket
from llama_orchestrator.services import upstream


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_connect_reaches_a_listener_and_reports_a_refusal(loop_factory) -> None:
    info = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 0))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with _listener() as listener:
            sock = await connect_socket((*info[:4], listener.getsockname()), loop)
            with sock:
                assert sock.getpeername() == listener.getsockname()
                assert not sock.getblocking()
        with pytest.raises(OSError) as refused:
            await connect_socket((*info[:4], ("127.0.0.1", _closed_port())), loop)
        assert refused.value.errno == errno.ECONNREFUSED

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


def test_session_requests_through_the_fast_connector_and_fails_as_aiohttp_does() -> None:
    async def main() -> None:
        async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(hello, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        session = upstream.new_session()
        try:
            if upstream._FAST_CONNECT:
                assert isinstance(session.connector, upstream._Connector)
            async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                assert (resp.status, await resp.read()) == (200, b"ok")
            with pytest.raises(aiohttp.ClientConnectorError):
                await session.get(f"http://127.0.0.1:{_closed_port()}/health")
        finally:
            await session.close()
            server.close()
            await server.wait_closed()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
