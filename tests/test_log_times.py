"""`logs --since/--until/-t`: the time index of a log (domain.log_times, adapters.log_times), the daemon writing it,
and the command locally, through the daemon and through --host."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from conftest import Cli, _cli_command, instance_doc
from helpers import free_port, subprocess_env, wait_until
from llama_orchestrator.adapters import log_times
from llama_orchestrator.adapters.log_times import note_growth, read_points, timed_lines
from llama_orchestrator.adapters.logfiles import index_path, rotate_if_needed, tail
from llama_orchestrator.domain.log_times import (
    Point,
    decode_points,
    encode_point,
    offset_since,
    offset_until,
    rfc3339,
    thinned,
    time_of,
    usable_points,
)

# -- the pure part: records, and which time for which byte ---------------------------------------------------------


def test_a_record_reads_back_as_written() -> None:
    points = [Point(0, 0.0), Point(52428800, 1733050000.123456)]
    assert decode_points("".join(encode_point(p) for p in points)) == points


def test_a_torn_record_is_skipped_and_so_is_the_one_glued_to_it() -> None:
    whole = encode_point(Point(10, 100.0))
    torn = encode_point(Point(12345, 200.0))[:5]  # "12345": a crash mid-write
    glued = torn + encode_point(Point(67890, 300.0))  # the next write lands after the torn bytes
    # "1234567890 300.000000 <crc>" would parse: only its checksum tells it is not a record that was written.
    assert glued.startswith("1234567890 300.000000 ")
    assert decode_points(whole + glued + encode_point(Point(70000, 400.0)) + torn) == [
        Point(10, 100.0),
        Point(70000, 400.0),
    ]


@pytest.mark.parametrize("junk", ["", "\n\n", "x y z\n", "1 2\n", "-5 1.0 00000000\n", "1 nan zzzzzzzz\n"])
def test_junk_in_an_index_is_no_point(junk: str) -> None:
    assert decode_points(junk) == []


def test_usable_points_end_with_the_files_size_and_mtime() -> None:
    assert usable_points([Point(6, 100.0)], 12, 300.0) == [Point(6, 100.0), Point(12, 300.0)]
    assert usable_points([], 12, 300.0) == [Point(12, 300.0)]  # no index: the mtime bounds every line
    assert usable_points([Point(12, 100.0)], 12, 300.0) == [Point(12, 100.0)]  # the first bound at an offset


def test_points_of_bytes_truncated_away_are_dropped() -> None:
    # Emptied and written again: only the points after the fall describe the file.
    assert usable_points([Point(50, 1.0), Point(90, 2.0), Point(5, 3.0)], 10, 4.0) == [Point(5, 3.0), Point(10, 4.0)]
    # Truncated and not noted again yet: a point past the end.
    assert usable_points([Point(5, 1.0), Point(90, 2.0)], 10, 4.0) == [Point(10, 4.0)]


def test_a_clock_set_back_does_not_unsort_the_times() -> None:
    assert usable_points([Point(5, 100.0), Point(9, 90.0)], 20, 95.0) == [
        Point(5, 100.0),
        Point(9, 100.0),
        Point(20, 100.0),
    ]


POINTS = [Point(6, 100.0), Point(12, 200.0), Point(20, 300.0)]


@pytest.mark.parametrize(
    ("end", "expected"),
    [(1, 100.0), (6, 100.0), (7, 200.0), (12, 200.0), (13, 300.0), (20, 300.0), (21, 300.0)],
)
def test_a_line_has_the_time_of_the_first_point_at_or_past_its_end(end: int, expected: float) -> None:
    assert time_of(POINTS, end) == expected


@pytest.mark.parametrize(
    ("since", "offset"), [(50.0, 0), (100.0, 0), (100.5, 6), (200.0, 6), (250.0, 12), (300.0, 12), (301.0, 20)]
)
def test_the_offset_after_which_lines_are_since(since: float, offset: int) -> None:
    assert offset_since(POINTS, since) == offset


@pytest.mark.parametrize(
    ("until", "offset"), [(50.0, 0), (100.0, 6), (150.0, 6), (200.0, 12), (299.9, 12), (300.0, 20), (400.0, 20)]
)
def test_the_offset_up_to_which_lines_are_until(until: float, offset: int) -> None:
    assert offset_until(POINTS, until) == offset


def test_thinning_keeps_the_newest_half_and_every_other_older_point() -> None:
    points = [Point(i, float(i)) for i in range(1000)]
    kept = thinned(points, 100)
    assert len(kept) <= 100 and kept[-50:] == points[-50:]
    assert kept == sorted(kept) and kept[0] == points[0]
    assert thinned(points[:10], 100) == points[:10]


def test_the_stamp_is_rfc3339_utc_with_microseconds() -> None:
    assert rfc3339(1733050000.123456) == "2024-12-01T10:46:40.123456Z"


# -- the adapter: real files ---------------------------------------------------------------------------------------


def logs_at_known_times(folder: Path) -> tuple[Path, Path]:
    """stdout: o1 o2 noted at 100, o3 o4 at 200, mtime 300; stderr: e1 noted at 150, e2 after it, mtime 250."""
    out, err = folder / "stdout.log", folder / "stderr.log"
    out.write_bytes(b"o1\no2\n")
    note_growth(out, 6, 100.0)
    with open(out, "ab") as f:
        f.write(b"o3\no4\n")
    note_growth(out, 12, 200.0)
    os.utime(out, (300, 300))
    err.write_bytes(b"e1\n")
    note_growth(err, 3, 150.0)
    with open(err, "ab") as f:
        f.write(b"e2\n")
    os.utime(err, (250, 250))
    return out, err


def shown(lines) -> list[tuple[float, str]]:
    return [(line.time, line.text) for line in lines]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({}, [(100.0, "o1"), (100.0, "o2"), (150.0, "e1"), (200.0, "o3"), (200.0, "o4"), (250.0, "e2")]),
        ({"since": 150.0}, [(150.0, "e1"), (200.0, "o3"), (200.0, "o4"), (250.0, "e2")]),
        ({"until": 150.0}, [(100.0, "o1"), (100.0, "o2"), (150.0, "e1")]),
        ({"since": 120.0, "until": 220.0}, [(150.0, "e1"), (200.0, "o3"), (200.0, "o4")]),
        ({"tail": 2}, [(200.0, "o4"), (250.0, "e2")]),
        ({"tail": 1, "until": 160.0}, [(150.0, "e1")]),
        ({"since": 251.0}, []),
    ],
)
def test_the_streams_are_merged_in_time_order_and_cut_by_since_and_until(
    tmp_path: Path, query: dict, expected: list
) -> None:
    out, err = logs_at_known_times(tmp_path)
    assert shown(timed_lines([out, err], **query)) == expected


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"one",
        b"one\n",
        b"\n\n",
        b"a\r\nb\r\n",
        b"short\n" + b"L" * 200_000 + b"\nafter\n" + b"M" * 70_000,  # lines across blocks, past the cap
        ("\u00e9" * 9000 + "\n").encode() * 3,  # the cap inside a two-byte character
        b"x\n" * 100_000,
    ],
)
def test_every_line_reads_as_the_tail_reads_it(tmp_path: Path, content: bytes) -> None:
    log = tmp_path / "stdout.log"
    log.write_bytes(content)
    note_growth(log, len(content) // 2, 100.0)  # a point somewhere: times must not change the lines
    assert [line.text for line in timed_lines([log])] == tail(log, 0)
    assert [line.text for line in timed_lines([log], tail=3)] == tail(log, 3)


def test_a_point_inside_a_line_gives_the_line_the_next_time(tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    log.write_bytes(b"whole\nhalf")  # stderr unbuffered: the daemon looked while the line was half written
    note_growth(log, 10, 100.0)
    with open(log, "ab") as f:
        f.write(b" and rest\nlast\n")
    note_growth(log, 25, 200.0)
    assert shown(timed_lines([log])) == [(100.0, "whole"), (200.0, "half and rest"), (200.0, "last")]
    assert shown(timed_lines([log], until=150.0)) == [(100.0, "whole")]  # the half line is not yet written then
    assert shown(timed_lines([log], tail=5, until=150.0)) == [(100.0, "whole")]
    assert shown(timed_lines([log], since=150.0)) == [(200.0, "half and rest"), (200.0, "last")]


def test_without_an_index_every_line_has_the_files_mtime(tmp_path: Path) -> None:
    log = tmp_path / "stdout.log"
    log.write_bytes(b"a\nb\nbeing written")
    os.utime(log, (500, 500))
    assert shown(timed_lines([log])) == [(500.0, "a"), (500.0, "b"), (500.0, "being written")]
    assert shown(timed_lines([log], since=501.0)) == []
    assert shown(timed_lines([log], until=499.0)) == []
    assert shown(timed_lines([tmp_path / "missing.log"])) == []


def test_an_index_with_a_torn_record_still_serves_and_is_private(tmp_path: Path) -> None:
    log = tmp_path / "stdout.log"
    log.write_bytes(b"one\ntwo\n")
    note_growth(log, 4, 100.0)
    with open(index_path(log), "a") as index:
        index.write("8 20")  # the daemon died mid-write
    note_growth(log, 8, 200.0)  # the next daemon appends after the torn bytes
    assert read_points(log) == [Point(4, 100.0)]
    assert shown(timed_lines([log])) == [(100.0, "one"), (log.stat().st_mtime, "two")]
    note_growth(log, 8, 300.0)
    assert read_points(log)[-1] == Point(8, 300.0)
    assert index_path(log).stat().st_mode & 0o777 == 0o600


def test_an_emptied_log_starts_its_index_again(tmp_path: Path) -> None:
    log = tmp_path / "stdout.log"
    log.write_bytes(b"old\n")
    note_growth(log, 4, 100.0)
    log.write_bytes(b"new\n")
    note_growth(log, 4, 200.0, restart=True)
    assert read_points(log) == [Point(4, 200.0)]


def test_rotation_moves_the_index_with_the_copy(tmp_path: Path) -> None:
    log = tmp_path / "stdout.log"
    log.write_bytes(b"one\ntwo\n")
    note_growth(log, 4, 100.0)
    note_growth(log, 8, 200.0)
    assert rotate_if_needed(log, 4, keep=2)
    copy = log.with_name("stdout.log.1")
    assert not index_path(log).exists() and log.stat().st_size == 0
    assert shown(timed_lines([copy])) == [(100.0, "one"), (200.0, "two")]  # the copy's offsets are the old ones
    assert index_path(copy).stat().st_mode & 0o777 == 0o600
    log.write_bytes(b"three\n")  # no index yet: a second rotation must not leave the first copy's index on it
    assert rotate_if_needed(log, 4, keep=2)
    assert read_points(log.with_name("stdout.log.2")) == [Point(4, 100.0), Point(8, 200.0)]
    assert not index_path(copy).exists()


def test_the_index_is_compacted_past_its_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log_times, "MAX_INDEX_BYTES", 4096)
    log = tmp_path / "stdout.log"
    log.write_bytes(b"x\n" * 2000)
    for n in range(1, 1001):
        note_growth(log, 2 * n, 1000.0 + n)
        assert index_path(log).stat().st_size <= 4096 + 40
    points = read_points(log)
    assert points[-1] == Point(2000, 2000.0) and points == sorted(points)
    assert 20 <= len(points) <= 4096 // 30
    assert index_path(log).stat().st_mode & 0o777 == 0o600


def test_since_seeks_rather_than_reads_the_whole_log(tmp_path: Path) -> None:
    """An 8 GB (sparse) log without a newline: read from its start, `--since` would take minutes."""
    log = tmp_path / "stdout.log"
    with open(log, "wb") as f:
        f.truncate(8 * 1024**3)
        f.seek(0, os.SEEK_END)
        f.write(b"\nrecent\n")
    size = log.stat().st_size
    note_growth(log, size - 7, 100.0)  # just past the newline that ends the long line
    note_growth(log, size, 200.0)
    started = time.perf_counter()
    assert shown(timed_lines([log], since=150.0)) == [(200.0, "recent")]
    assert shown(timed_lines([log], since=150.0, tail=10)) == [(200.0, "recent")]
    assert time.perf_counter() - started < 2


# -- the daemon's side: a point when a log has grown, none when it has not -------------------------------------


def test_the_daemon_notes_a_point_when_a_log_grows_and_none_when_it_is_quiet(tmp_path: Path) -> None:
    from llama_orchestrator.adapters.home import Home
    from llama_orchestrator.domain.config import InstanceConfig
    from llama_orchestrator.services.daemon import ServiceOps
    from llama_orchestrator.services.instances import InstanceService

    home = Home(tmp_path / "home")
    config = InstanceConfig.model_validate(
        {"name": "w", "model": {"path": "m.gguf"}, "server": {"port": 8101}, "logs": {"max_size_mb": 0.001}}
    )
    ops = ServiceOps(InstanceService(home))
    log = home.log_path("w", "stdout")
    log.parent.mkdir(parents=True)
    log.write_bytes(b"loading\n")

    def noted(size: int) -> Point:
        return Point(size, pytest.approx(log.stat().st_mtime, abs=1e-5))  # the file's mtime, to the microsecond

    def look() -> float:
        """One look, due now; returns how long until the next one."""
        ops._rotation_next.clear()
        ops.rotate_logs("w", config)
        return ops._rotation_next["w"] - time.monotonic()

    look()
    assert read_points(log) == [noted(8)]
    look()
    assert read_points(log) == [noted(8)]  # not grown: nothing written
    with open(log, "ab") as out:
        out.write(b"serving\n")
    assert look() <= 1.0  # growing: looked at again within a second
    assert read_points(log)[1:] == [noted(16)]
    log.write_bytes(b"again\n")  # emptied and written by someone else: the old points describe other bytes
    look()
    assert read_points(log) == [noted(6)]
    with open(log, "ab") as out:
        out.write(b"x" * 2000 + b"\n")  # past max_size_mb: rotated, and the index goes with the copy
    look()
    assert [p.offset for p in read_points(log.with_name("stdout.log.1"))] == [6]
    assert not index_path(log).exists() and log.stat().st_size == 0


# -- end to end: a daemon notes the times, `logs` answers locally, through the daemon and through --host ---------


@pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script")
def test_logs_since_until_and_timestamps_with_a_daemon_watching(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    from test_api import start_daemon

    cli.write_config("clock", instance_doc("clock", tiny_model, free_port(), fake_binary))
    cli.run("up", "clock", "-d", "--wait", "--timeout", "60", check=True)
    daemon = start_daemon(cli)
    try:
        log = cli.home / "logs" / "clock" / "stdout.log"  # the fake server writes to stderr only: this is ours

        def log_line(text: str) -> int:
            """Append a line while the daemon watches; returns the log's size once the daemon has noted it."""
            with open(log, "ab") as out:
                out.write(text.encode() + b"\n")
            size = log.stat().st_size
            noted = wait_until(lambda: [p for p in read_points(log) if p.offset == size], timeout=15)
            # The daemon's point is the file's mtime: the time its last byte was written.
            assert noted[0].time == pytest.approx(log.stat().st_mtime, abs=1e-5)
            return size

        before = log.stat().st_size if log.exists() else 0
        first = log_line("first moment")
        second = log_line("second moment")
        assert index_path(log).stat().st_mode & 0o777 == 0o600
        # Exact times for the assertions: the index rewritten as if the two lines were seen two hours and one
        # hour ago (stdout grows no more, so the daemon adds nothing to it).
        now = round(time.time())
        t1, t2 = now - 7200 + 0.25, now - 3600 + 0.25  # exact in binary: no rounding between here and the index
        index_path(log).write_text(
            "".join(encode_point(p) for p in [Point(before, now - 10800), Point(first, t1), Point(second, t2)])
        )
        since_t2 = datetime.fromtimestamp(t2 - 0.5).isoformat()  # zone-less: local time, as Docker reads it
        where = {"local": [], "daemon": [], "host": ["--host", daemon.url]}
        for how, prefix in where.items():
            cli.daemon = how != "local"

            def logs(*args: str, how: str = how, prefix: list = prefix) -> list[str]:
                run = cli.run(*prefix, "logs", "clock", *args, timeout=60)
                assert run.returncode == 0, (how, args, run.stderr)
                return run.stdout.splitlines()

            assert logs("--stdout", "--since", "90m") == ["second moment"], how
            assert logs("--stdout", "--since", since_t2, "-t") == [f"{rfc3339(t2)} second moment"], how
            assert logs("--stdout", "--since", "150m", "--until", f"{t1 + 1:.3f}") == ["first moment"], how
            # Both streams: stderr's lines were all seen since the daemon started, after --until.
            assert logs("--since", "150m", "--until", "90m", "--timestamps") == [f"{rfc3339(t1)} first moment"], how
            assert logs("--stdout", "--until", "90m", "--tail", "1") == ["first moment"], how
            # Following ends when --until passes; the history comes first.
            started = time.monotonic()
            assert logs("--stdout", "-f", "--since", "150m", "--until", f"{time.time() + 1.5:.3f}")[:2] == [
                "first moment",
                "second moment",
            ], how
            assert time.monotonic() - started < 30
            refused = cli.run(*prefix, "logs", "clock", "--since", "last tuesday")
            assert refused.returncode != 0 and "not a time" in refused.stderr, (how, refused.stderr)
        answer = httpx.get(
            f"{daemon.url}/api/instances/clock/logs",
            params={"stream": "stdout", "since": "90m", "timestamps": "true", "format": "json"},
            timeout=30,
        )
        assert answer.status_code == 200 and answer.json() == [f"{rfc3339(t2)} second moment"]
        bad = httpx.get(f"{daemon.url}/api/instances/clock/logs", params={"until": "soon"}, timeout=30)
        assert bad.status_code == 400 and "not a time" in json.dumps(bad.json())
        # Following with -t: the tail with its time, then a new line with the time the follower read it.
        follow_with_timestamps(cli, [], log, f"{rfc3339(t2)} second moment")
        follow_with_timestamps(cli, ["--host", daemon.url], log, "followed locally")
    finally:
        cli.daemon = True
        cli.run("daemon", "stop", timeout=60)
        cli.run("down", "--all", "--timeout", "1", timeout=120)


def follow_with_timestamps(cli: Cli, prefix: list[str], log: Path, last: str) -> None:
    """`logs -f -t --tail 1`: prints ``last``, then the line appended now with a time between its write and now."""
    cli.daemon = bool(prefix)
    env = subprocess_env({"LLAMA_ORCH_HOME": str(cli.home), **({} if prefix else {"LLAMA_ORCH_NO_DAEMON": "1"})})
    command = [*_cli_command(), *prefix, "logs", "clock", "--stdout", "-f", "-t", "--tail", "1"]
    follower = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(follower.stdout or ()), daemon=True)
    reader.start()
    try:
        wait_until(lambda: seen, timeout=30)
        assert seen[0].rstrip("\n").endswith(last), (prefix, seen)
        written = time.time()
        text = "followed remotely" if prefix else "followed locally"
        with open(log, "ab") as out:
            out.write(f"{text}\n".encode())
        wait_until(lambda: len(seen) == 2, timeout=30)
        stamp, shown_text = seen[1].rstrip("\n").split(" ", 1)
        assert shown_text == text and stamp.endswith("Z"), (prefix, seen)
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        assert written - 0.01 <= moment <= time.time(), (prefix, stamp)
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(10)
        reader.join(10)
