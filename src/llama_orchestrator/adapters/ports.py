"""Is a TCP port free, and which one to pick when the user did not say."""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Iterable

FIRST_AUTO_PORT = 8001


def is_port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could bind ``host:port`` now (as llama-server would, with SO_REUSEADDR on POSIX)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if sys.platform != "win32":
            # A port in TIME_WAIT after a stop is free for a server that sets SO_REUSEADDR, as llama-server does.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    # Something may listen on the wildcard address or on loopback while we asked about the other one.
    return not _someone_listens(port)


def _someone_listens(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        # Closed with a reset: this check must not itself leave a TIME_WAIT that blocks the server's bind.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pick_port(taken: Iterable[int], host: str = "127.0.0.1", start: int = FIRST_AUTO_PORT) -> int:
    """The first port from ``start`` that no other instance is configured with and that is free now."""
    reserved = set(taken)
    for port in range(start, 65536):
        if port not in reserved and is_port_free(port, host):
            return port
    raise RuntimeError("no free TCP port found")
