"""One plain HTTP/1.1 GET over a socket, standard library only (``socket``): what the CLI's fast path needs to ask
the daemon's API for `ps` in a few milliseconds. ``http.client`` costs about 40 ms of imports (the ``email``
package), httpx about 150 ms. ``api_client.get_json`` maps its answers to the project's errors.
"""

from __future__ import annotations

import socket

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class NotPlainHttp(ValueError):
    """A URL this module does not speak to (https, a proxy's business, user info): use httpx."""


def normalize_url(url: str) -> str:
    """``host:port`` or a full URL; no trailing slash."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


def split_url(url: str) -> tuple[str, int, str, str]:
    """``http://host:port/prefix`` -> ``(host, port, authority, prefix)``; NotPlainHttp for anything else."""
    scheme, _, rest = url.partition("://")
    authority, _, prefix = rest.partition("/")
    if scheme != "http" or not authority or any(c in rest for c in "?#@ \r\n"):
        raise NotPlainHttp(f"not a plain http:// URL: {url}")
    if authority.startswith("["):  # [::1]:8000
        host, _, port = authority[1:].partition("]")
        port = port.removeprefix(":")
    elif ":" in authority:
        host, _, port = authority.rpartition(":")
    else:
        host, port = authority, ""
    if port and not port.isdigit():
        raise NotPlainHttp(f"not a port: {port!r} in {url}")
    prefix = prefix.rstrip("/")
    return host, int(port) if port else 80, authority, f"/{prefix}" if prefix else ""


def quote(text: str) -> str:
    """Percent-encoding of a query part (``urllib.parse.quote`` with no safe characters, without its import)."""
    return "".join(
        chr(b) if (chr(b).isalnum() and b < 128) or chr(b) in "-._~" else f"%{b:02X}" for b in text.encode("utf-8")
    )


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    """``socket.create_connection``, but an IP literal is connected without a lookup (which imports idna)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock
    return socket.create_connection((host, port), timeout=timeout)


def get(
    url: str,
    path: str,
    params: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    *,
    timeout: float = 30.0,
    connect_timeout: float = 5.0,
) -> tuple[int, str, bytes]:
    """``GET url+path?params``: the status, its reason and the body. Raises ``ConnectionError``-like ``OSError``
    when nothing answers (connect), ``TimeoutError`` when the answer does not come in ``timeout`` seconds,
    ``NotPlainHttp`` for a URL it does not speak to, ``OSError`` for an answer that is not HTTP."""
    host, port, authority, prefix = split_url(url)
    query = "&".join(f"{quote(str(k))}={quote(str(v))}" for k, v in (params or {}).items())
    target = f"{prefix}/{path.lstrip('/')}"
    lines = [f"GET {target}{'?' + query if query else ''} HTTP/1.1", f"Host: {authority}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    sock = _connect(host, port, connect_timeout)
    chunks = []
    try:
        sock.settimeout(timeout)
        sock.sendall(request)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    finally:
        sock.close()
    return parse_response(b"".join(chunks))


def parse_response(data: bytes) -> tuple[int, str, bytes]:
    """Status, reason and body of a whole HTTP/1.1 answer (the server closed the connection after it)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise OSError("not an HTTP answer")
    fields = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if "chunked" in fields.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    elif fields.get("content-length", "").isdigit():
        body = body[: int(fields["content-length"])]
    return int(parts[1]), parts[2] if len(parts) > 2 else "", body


def _dechunk(body: bytes) -> bytes:
    out = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
        except ValueError:
            raise OSError("bad chunked encoding") from None
        if size == 0:
            break
        out.append(rest[:size])
        body = rest[size + 2 :]
    return b"".join(out)
