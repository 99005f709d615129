"""A small fake Hugging Face Hub for tests and demos: the endpoints ``huggingface_hub`` calls to resolve and
download files, served from memory by a stdlib HTTP server. Point the client at it with ``HF_ENDPOINT``.

    GET  /api/models/<user>/<repo>[/revision/<rev>]   model info; ``?blobs=true`` adds size and LFS sha256 per file
    HEAD /<user>/<repo>/resolve/<rev>/<file>          X-Repo-Commit, ETag / X-Linked-Etag (sha256), X-Linked-Size
    GET  /<user>/<repo>/resolve/<rev>/<file>          the bytes, ``Range: bytes=N-`` answered 206

Unknown repos and revisions answer 404 with ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` as the Hub does.
Knobs for tests (``FakeHub`` attributes): ``stall_after`` (file -> byte count: send that many bytes, then hold the
connection until ``release()``), ``wrong_sha`` (files whose advertised sha256 is wrong), ``advertised_size`` (file ->
size to claim), ``required_token`` (answer 401 without ``Authorization: Bearer <it>``). ``requests`` records every
request (method, path, Range, Authorization).

    python -m llama_orchestrator.testing.fake_hub --port 8765 user/repo model-Q4_K_M.gguf model-Q8_0.gguf
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Recorded:
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str = COMMIT


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    stall_after: dict[str, int] = field(default_factory=dict)
    wrong_sha: set[str] = field(default_factory=set)
    advertised_size: dict[str, int] = field(default_factory=dict)
    required_token: str | None = None
    requests: list[Recorded] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _release: threading.Event = field(default_factory=threading.Event)

    def add(self, repo: str, files: dict[str, bytes], commit: str = COMMIT) -> None:
        self.repos[repo] = FakeRepo(dict(files), commit)

    def sha256(self, repo: str, name: str) -> str:
        digest = hashlib.sha256(self.repos[repo].files[name]).hexdigest()
        return "0" * 64 if name in self.wrong_sha else digest

    def size(self, repo: str, name: str) -> int:
        return self.advertised_size.get(name, len(self.repos[repo].files[name]))

    def downloads(self, name: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith("/" + name)]

    def release(self) -> None:
        """Let stalled transfers end (their connections close without the rest)."""
        self._release.set()

    # -- serving ----------------------------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake hub is not started")
        host, port = self._server.socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?/?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib method's parameter name; quiet
        pass

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, *, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        hub = self.hub
        hub.requests.append(Recorded(self.command, path, self.headers.get("Range"), self.headers.get("Authorization")))
        if hub.required_token and self.headers.get("Authorization") != f"Bearer {hub.required_token}":
            return self._error(401, "RepoNotFound", "Invalid username or password.")
        if match := _INFO.match(path):
            return self._info(match.group("repo"), match.group("rev"), "blobs=true" in (urlsplit(self.path).query))
        if match := _RESOLVE.match(path):
            return self._file(match.group("repo"), match.group("rev"), match.group("file"), body=body)
        return self._error(404, "EntryNotFound", "not found")

    def _repo(self, repo: str, rev: str | None) -> FakeRepo | None:
        found = self.hub.repos.get(repo)
        if found is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if rev not in (None, "main", found.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return found

    def _info(self, repo: str, rev: str | None, blobs: bool) -> None:
        found = self._repo(repo, rev)
        if found is None:
            return
        siblings = []
        for name in sorted(found.files):
            entry: dict = {"rfilename": name}
            if blobs:
                sha = self.hub.sha256(repo, name)
                size = self.hub.size(repo, name)
                entry.update(size=size, blobId=sha[:40], lfs={"size": size, "sha256": sha, "pointerSize": 134})
            siblings.append(entry)
        data = {
            "_id": repo,
            "id": repo,
            "modelId": repo,
            "sha": found.commit,
            "private": False,
            "tags": ["gguf"],
            "siblings": siblings,
        }
        self._json(200, data)

    def _file(self, repo: str, rev: str, name: str, *, body: bool) -> None:
        found = self._repo(repo, rev)
        if found is None:
            return None
        if name not in found.files:
            return self._error(404, "EntryNotFound", f"{name} does not exist")
        data = found.files[name]
        sha = self.hub.sha256(repo, name)
        start = 0
        status = 200
        wanted = self.headers.get("Range")
        if wanted and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())):
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            status = 206
        payload = data[start:]
        self.send_response(status)
        self.send_header("X-Repo-Commit", found.commit)
        self.send_header("ETag", f'"{sha}"')
        self.send_header("X-Linked-Etag", f'"{sha}"')
        self.send_header("X-Linked-Size", str(self.hub.size(repo, name)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(payload)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return None
        stall = self.hub.stall_after.get(name)
        if stall is not None and start < stall:
            self.wfile.write(data[start:stall])
            self.wfile.flush()
            self.hub._release.wait(120)  # hold the connection: the client sees a transfer that stopped half way
            self.close_connection = True
            return None
        for offset in range(0, len(payload), 64 * 1024):
            self.wfile.write(payload[offset : offset + 64 * 1024])
        return None

    def _json(self, status: int, data: dict) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)

    def _error(self, status: int, code: str, message: str) -> None:
        raw = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve GGUF files as a fake Hugging Face Hub repository.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("repo", help="user/repo")
    parser.add_argument("files", nargs="+", help="files to serve; NAME=PATH serves PATH as NAME")
    args = parser.parse_args(argv)
    files = {}
    for spec in args.files:
        name, _, path = spec.partition("=")
        files[Path(name).name if not path else name] = Path(path or name).read_bytes()
    hub = FakeHub()
    hub.add(args.repo, files)
    url = hub.start(args.host, args.port)
    print(f"fake Hub on {url}: {args.repo} with {', '.join(sorted(files))} (HF_ENDPOINT={url})", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
