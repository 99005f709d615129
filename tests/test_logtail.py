"""Log tailing and following on real files: what a tail returns, what a cut line looks like, and what it costs
(time and memory bounded by what is returned, not by the length of a line). The fault-injection test at the end
runs a real daemon: a 50 MB single-line log is tailed through its API while `/healthz` keeps answering."""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import pytest

from conftest import Cli, instance_doc
from helpers import free_port
from llama_orchestrator.adapters.logfiles import (
    BLOCK_BYTES,
    LineSplitter,
    LogCursor,
    cut_marker,
    follow,
    rotate_if_needed,
    tail,
)

BIG = 50 * 1024 * 1024  # the line: one 50 MB line in an instance's log


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- what a tail returns ------------------------------------------------------------------------------------------

CONTENTS = [
    b"",
    b"one",
    b"one\n",
    b"one\ntwo",
    b"one\ntwo\n",
    b"\n",
    b"\n\n\n",
    b"a\n\nb\n\n",
    b"crlf\r\nlines\r\n",
    # lines that straddle the 64 KiB block boundary, and a newline exactly on it
    b"x" * (BLOCK_BYTES - 1) + b"\n" + b"y" * 10 + b"\n" + b"z" * (BLOCK_BYTES + 5) + b"\nend",
    b"".join(f"line {i}\n".encode() for i in range(20000)),
]


@pytest.mark.parametrize("content", CONTENTS, ids=range(len(CONTENTS)))
@pytest.mark.parametrize("lines", [1, 2, 3, 5, 1000, 0])
def test_tail_is_the_last_lines_of_the_file(tmp_path: Path, content: bytes, lines: int) -> None:
    path = write(tmp_path / "log", content)
    expected = [line.removesuffix("\r") for line in content.decode().split("\n")]
    if content.endswith(b"\n") or not content:
        expected = expected[:-1]  # a final newline ends the last line
    want = expected[-lines:] if lines > 0 else expected
    assert tail(path, lines, line_cap=1 << 20) == want


def test_tail_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert tail(tmp_path / "nope.log", 5) == []


def test_a_long_line_is_cut_with_a_marker_naming_its_length(tmp_path: Path) -> None:
    long = b"A" * 100_000
    path = write(tmp_path / "log", b"first\n" + long + b"\nlast\n")
    assert tail(path, 5, line_cap=1000) == ["first", "A" * 1000 + cut_marker(100_000), "last"]
    assert tail(path, 0, line_cap=1000) == ["first", "A" * 1000 + cut_marker(100_000), "last"]
    assert cut_marker(100_000) == "… [line cut: 100000 bytes]"


def test_a_cut_inside_a_multibyte_character_shows_no_replacement_mark(tmp_path: Path) -> None:
    path = write(tmp_path / "log", "é".encode() * 1000 + b"\n")  # 2 bytes each: a cap of 101 splits one
    (line,) = tail(path, 1, line_cap=101)
    assert line == "é" * 50 + cut_marker(2000)


def test_a_50_mb_line_is_tailed_in_bounded_time_and_memory(tmp_path: Path) -> None:
    path = tmp_path / "stderr.log"
    with open(path, "wb") as out:
        out.write(b"before\n")
        out.write(b"Q" * BIG)  # one line, no newline inside
        out.write(b"\nafter 1\nafter 2\n")
    tracemalloc.start()
    started = time.perf_counter()
    try:
        got = tail(path, 5)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == ["before", "Q" * 16384 + cut_marker(BIG), "after 1", "after 2"]
    # The old tail concatenated blocks (quadratic: 2.2 s at 10 MB) and held the whole line; this one scans blocks.
    assert elapsed < 5, f"tail took {elapsed:.2f} s"
    assert peak < 4 * 1024 * 1024, f"tail held {peak} bytes at once"


# -- following --------------------------------------------------------------------------------------------------


def test_the_splitter_caps_a_line_fed_in_pieces_and_holds_no_more_than_the_cap() -> None:
    splitter = LineSplitter(line_cap=10)
    assert splitter.feed(b"short\nlong") == ["short"]
    for _ in range(1000):
        assert splitter.feed(b"x" * 1000) == []
        assert len(splitter._head) <= 10
    assert splitter.feed(b"\r\nnext") == ["longxxxxxx" + cut_marker(1_000_005)]
    assert splitter.flush() == ["next"]


def test_a_cursor_reads_a_50_mb_appended_line_in_bounded_batches(tmp_path: Path) -> None:
    path = write(tmp_path / "stdout.log", b"old\n")
    cursor = LogCursor(path)
    assert cursor.read_lines() == []  # placed at the end
    with open(path, "ab") as out:
        out.write(b"W" * BIG + b"\nnew\n")
    tracemalloc.start()
    try:
        batches = []
        while True:
            batches.append(cursor.read_lines())
            if cursor.at_end:
                break
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        cursor.close()
    assert [line for batch in batches for line in batch] == ["W" * 16384 + cut_marker(BIG), "new"]
    assert len(batches) > 1  # a flood comes in several bounded reads, not one 50 MB read
    assert peak < 16 * 1024 * 1024, f"the cursor held {peak} bytes at once"


def test_follow_reads_a_whole_flood_before_it_asks_whether_to_stop(tmp_path: Path) -> None:
    path = write(tmp_path / "stdout.log", b"V" * (10 * 1024 * 1024) + b"\ntail line\n")
    # stop() is true from the start: follow must still read every batch of the flood, because it only asks once
    # the files are read to their ends (a batch in the middle of a long line yields no line, and is not the end).
    got = [line for _, line in follow([path], stop=lambda: True, poll_s=5, from_end=False)]
    assert got == ["V" * 16384 + cut_marker(10 * 1024 * 1024), "tail line"]


def test_rotated_copies_are_private(tmp_path: Path) -> None:
    if os.name != "posix":
        pytest.skip("file modes are POSIX")
    path = write(tmp_path / "stdout.log", b"x" * 100 + b"\n")
    path.chmod(0o600)
    assert rotate_if_needed(path, 10, keep=3)
    assert (path.with_name("stdout.log.1").stat().st_mode & 0o777) == 0o600
    assert path.stat().st_size == 0


def test_the_dashboard_detail_of_an_instance_with_a_50_mb_line_is_quick(
    cli: Cli, tiny_model: Path, fake_binary: Path
) -> None:
    from llama_orchestrator.adapters.home import Home
    from llama_orchestrator.services.instances import InstanceService
    from llama_orchestrator.services.instances_port import LocalInstances
    from llama_orchestrator.tui.data import Backend

    cli.write_config("wide", instance_doc("wide", tiny_model, free_port(), fake_binary))
    log = cli.home / "logs" / "wide" / "stderr.log"
    log.parent.mkdir(parents=True)
    write(log, b"loading\n" + b"P" * BIG + b"\n")
    started = time.perf_counter()
    detail = Backend(LocalInstances(InstanceService(Home(cli.home))), daemon=lambda: None).detail("wide")
    elapsed = time.perf_counter() - started
    assert detail.stderr == ("loading", "P" * 16384 + cut_marker(BIG))
    assert elapsed < 5, f"the detail took {elapsed:.1f} s (it took 142 s before the tail was fixed)"


# -- fault injection: a real daemon, a 50 MB line, /healthz and the router keep answering ------------------------


@pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script")
def test_tailing_a_50_mb_line_through_the_daemon_does_not_stall_the_api(
    cli: Cli, tiny_model: Path, fake_binary: Path
) -> None:
    from test_api import start_daemon

    port = free_port()
    # logs.max_size_mb above what is written: the daemon's rotation would truncate the log under the tail.
    cli.write_config(
        "flood",
        instance_doc(
            "flood",
            tiny_model,
            port,
            fake_binary,
            env={"HF_TOKEN": "hf_secret"},
            logs={"max_size_mb": 1000, "rotation": 1},
        ),
    )
    cli.run("up", "flood", "-d", "--wait", "--timeout", "60", check=True)
    daemon = start_daemon(cli)  # adopts the running instance
    try:
        # stdout: the fake server logs each request to stderr, which would push the long line out of a tail.
        log = cli.home / "logs" / "flood" / "stdout.log"
        with open(log, "ab") as out:
            out.write(b"Z" * BIG + b"\nafter the long line\n")
        cut = "Z" * 16384 + cut_marker(BIG)
        client = httpx.Client(base_url=daemon.url, timeout=30)
        assert client.get("/healthz").status_code == 200
        # (secrets at rest, through the same daemon: /api shows the instance's env masked)
        assert client.get("/api/instances/flood").json()["config"]["env"] == {"HF_TOKEN": "***"}
        results: dict = {"followed": []}

        def tail_through_the_daemon() -> None:
            started = time.perf_counter()
            results["run"] = cli.run("logs", "flood", "--stdout", "--tail", "5", timeout=60)
            results["elapsed"] = time.perf_counter() - started

        def follow_through_the_api() -> None:
            params = {"tail": 2, "follow": "true", "stream": "stdout"}
            with httpx.stream("GET", f"{daemon.url}/api/instances/flood/logs", params=params, timeout=30) as answer:
                for line in answer.iter_lines():
                    results["followed"].append(line)
                    if len(results["followed"]) == 2:  # the tail is in: now a long line to follow
                        with open(log, "ab") as out:
                            out.write(b"Y" * BIG + b"\n")
                    if len(results["followed"]) == 3:
                        return

        workers = [threading.Thread(target=tail_through_the_daemon), threading.Thread(target=follow_through_the_api)]
        for worker in workers:
            worker.start()
        health_s, routed_s = [], []
        while any(worker.is_alive() for worker in workers):
            started = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            health_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            routed = client.post(
                "/v1/chat/completions",
                json={"model": "flood", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            )
            assert routed.status_code == 200, routed.text
            routed_s.append(time.perf_counter() - started)
        for worker in workers:
            worker.join()
        client.close()
        run = results["run"]
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        # The follower below may already have appended (part of) a Y line: it can end the tail.
        assert 2 <= len(lines) <= 5 and cut in lines and lines[lines.index(cut) + 1] == "after the long line"
        assert all(len(line) <= len(cut) for line in lines)
        assert results["elapsed"] < 10, f"`logs --tail 5` took {results['elapsed']:.1f} s"
        assert results["followed"] == [cut, "after the long line", "Y" * 16384 + cut_marker(BIG)]
        # Generous bounds for a 2-core machine shared with other work; the stall this catches lasted 99-120 s.
        assert health_s and max(health_s) < 0.5, f"slowest /healthz: {max(health_s):.3f} s of {len(health_s)}"
        assert max(routed_s) < 0.5, f"slowest routed chat completion: {max(routed_s):.3f} s of {len(routed_s)}"
    finally:
        cli.run("daemon", "stop", timeout=60)
        cli.run("down", "--all", "--timeout", "1", timeout=120)
