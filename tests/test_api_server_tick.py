"""The daemon's uvicorn server ticks once a second (not ten times), keeps its Date header right, and still stops at
once when asked (``api.server._second_tick_server``): a real server on a real socket."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

import httpx

from helpers import free_port, wait_until
from llama_orchestrator.api.server import ApiServer, bind_socket


async def hello_app(scope: dict, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


def serve() -> tuple[ApiServer, str, list[float]]:
    port = free_port()
    server = ApiServer(hello_app, bind_socket("127.0.0.1", port))
    ticks: list[float] = []
    on_tick = server.server.on_tick

    async def counted(counter: int) -> bool:
        ticks.append(time.monotonic())
        return await on_tick(counter)

    server.server.on_tick = counted  # type: ignore[method-assign]
    server.start()
    return server, f"http://127.0.0.1:{port}", ticks


def test_the_api_server_ticks_once_a_second_and_its_date_header_is_right() -> None:
    server, url, ticks = serve()
    try:
        wait_until(lambda: len(ticks) >= 1, 10, message="the first tick")
        first = len(ticks)
        started = time.monotonic()
        wait_until(lambda: time.monotonic() - started >= 2.5, 10, interval=0.1)
        during = len(ticks) - first
        assert 1 <= during <= 4, f"{during} ticks in 2.5 s (uvicorn's own loop: 25)"
        for _ in range(3):
            response = httpx.get(url)
            assert response.text == "hello"
            date = parsedate_to_datetime(response.headers["date"]).timestamp()
            # whole seconds, refreshed once a second: never more than 2 s behind (stock uvicorn's bound as well)
            assert -0.5 <= time.time() - date < 2.05, response.headers["date"]
            seen = len(ticks)
            wait_until(lambda seen=seen: len(ticks) > seen, 5, interval=0.02)  # across a tick
    finally:
        server.stop()


def test_a_stop_right_after_a_tick_does_not_wait_for_the_next_one() -> None:
    server, _, ticks = serve()
    try:
        wait_until(lambda: len(ticks) >= 2, 10, interval=0.005, message="two ticks")
        mark = len(ticks)
        wait_until(lambda: len(ticks) > mark, 5, interval=0.005)  # a tick just happened: the next is ~1 s away
    finally:
        asked = time.monotonic()
        server.stop()
        took = time.monotonic() - asked
    assert not server.thread.is_alive()
    assert took < 0.6, f"stop took {took:.2f} s: the loop waited for its next tick"
