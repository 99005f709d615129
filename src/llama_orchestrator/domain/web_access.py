"""Which requests a browser may make of the daemon: the Host, Origin and content-type rules (pure; the ASGI entry,
``api.server.OrchestratorApp``, applies them before routing).

Why: a daemon on loopback without keys is reachable by every web page the user opens. With DNS rebinding
(Ollama's CVE-2024-28224) a page points its own name at 127.0.0.1 and then talks to us as "same origin": only the
``Host`` header, which still carries the page's name, gives it away. Without rebinding, a page can still send
"simple" cross-origin requests that need no CORS preflight (an HTML form, a ``text/plain`` or body-less
``fetch``): only the ``Origin`` header and the content type give those away. Browsers cannot forge either header.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", "", "*"})  # noqa: S104 - recognises wildcard binds, binds nothing
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def normalize_name(name: str) -> str:
    """A host name or address as compared here: lower case, no brackets, no trailing dot, IPs in canonical form."""
    name = name.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
    try:
        return ipaddress.ip_address(name).compressed
    except ValueError:
        return name


def split_host(value: str) -> tuple[str, int | None]:
    """A ``Host`` header (``name``, ``name:port``, ``[v6]:port``) as ``(normalized name, port or None)``."""
    value = value.strip()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
    else:
        name, port = value, ""  # a bare IPv6 address (not valid in Host; harmless to compare)
    return normalize_name(name), int(port) if port.isdigit() else None


def is_loopback_name(name: str) -> bool:
    """``localhost``, any ``*.localhost`` (browsers resolve those to loopback themselves, RFC 6761, so no page can
    rebind them) and the loopback addresses 127.0.0.0/8 and ::1."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


HOST_ANSWERS_MAX = 256


class HostPolicy:
    """The names the daemon serves: loopback, ``served`` (the bind address; with a wildcard bind, this machine's
    names and addresses), and ``allowed`` (``api.allowed_hosts``: exact names, ``*.example.com`` for the
    subdomains, ``*`` for any)."""

    def __init__(self, served: Iterable[str], allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        self.any = "*" in allowed
        self.suffixes = tuple(normalize_name(a[2:]) for a in allowed if a.startswith("*.") and len(a) > 2)
        self.names = {normalize_name(a) for a in allowed if not a.startswith("*")}
        self.names |= {normalize_name(s) for s in served if normalize_name(s) not in WILDCARD_BINDS}
        self._answers: dict[str, bool] = {}

    def allows(self, host_header: str | None) -> bool:
        if host_header is None:
            return True  # HTTP/1.0 without Host: no browser sends that, so it cannot be a rebinding page
        # Every request asks, almost always with the same one or two values: the answer is remembered (parsing
        # the name as an IP address each time was a visible share of a small request's CPU). Bounded: a client
        # sending a new Host each time empties it instead of growing it.
        known = self._answers.get(host_header)
        if known is None:
            if len(self._answers) >= HOST_ANSWERS_MAX:
                self._answers.clear()
            known = self._answers[host_header] = self._allows(host_header)
        return known

    def _allows(self, host_header: str) -> bool:
        name, _ = split_host(host_header)
        return (
            self.any
            or is_loopback_name(name)
            or name in self.names
            or any(name.endswith("." + s) for s in self.suffixes)
        )


def origin_key(origin: str) -> tuple[str, str, int] | None:
    """``scheme://host[:port]`` as ``(scheme, normalized host, port with the scheme's default)``; None for
    ``null`` (sandboxed frames, ``file://`` pages) and anything that is not such a URL."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if not scheme or not parts.hostname:
        return None
    port = port if port is not None else DEFAULT_PORTS.get(scheme)
    if port is None:
        return None
    return scheme, normalize_name(parts.hostname), port


def same_origin(origin: str, host_header: str | None) -> bool:
    """The page was served under the Host this request is addressed to (the daemon's own pages, /docs, /ui/).
    A Host without a port means the origin scheme's default port (a TLS proxy in front keeps the name)."""
    key = origin_key(origin)
    if key is None or host_header is None:
        return False
    scheme, name, port = key
    host_name, host_port = split_host(host_header)
    return name == host_name and port == (host_port if host_port is not None else DEFAULT_PORTS.get(scheme))


class OriginPolicy:
    """``api.cors_origins``: the web origins other than the daemon's own that may call it from a browser. Exact
    origins (``https://app.example:3000``; a default port may be left out), ``null`` if really wanted, ``*`` for
    any (then even ``null``)."""

    def __init__(self, cors_origins: Iterable[str]) -> None:
        origins = [o.strip() for o in cors_origins]
        self.any = "*" in origins
        self.null = "null" in origins
        self.keys = {key for key in map(origin_key, origins) if key is not None}

    def allows(self, origin: str, host_header: str | None) -> bool:
        if self.any or same_origin(origin, host_header):
            return True
        if origin.strip() == "null":
            return self.null
        return origin_key(origin) in self.keys

    def cross_origin(self, origin: str, host_header: str | None) -> bool:
        """Allowed, and not the daemon's own page: the answer needs CORS headers for the browser to read it."""
        return self.allows(origin, host_header) and not same_origin(origin, host_header)


def media_type(content_type: str | None) -> str | None:
    if content_type is None:
        return None
    return content_type.partition(";")[0].strip().lower()


def preflighted(*, media: str | None, has_body: bool, has_authorization: bool, origin_allowed: bool) -> bool:
    """Whether a state-changing control request is one that no foreign page can send without a CORS preflight
    (which the daemon refuses for foreign origins): a JSON body, or a body-less request with an ``Authorization``
    header (not safelisted, so it forces a preflight even when no keys are configured), or one from an allowed
    origin. An HTML form, ``text/plain``, or a bare body-less ``fetch`` are all "simple" requests and are refused.
    """
    if media is not None:
        return media == "application/json"
    if has_body:
        return False
    return has_authorization or origin_allowed
