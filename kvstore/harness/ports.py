"""Free TCP ports on loopback, chosen before the server that will listen on them starts."""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct ports on ``host`` that nothing listens on right now.

    They are bound together before any is released, so they differ; another
    program may still take one before its server binds it."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = HOST) -> int:
    """One port on ``host`` that nothing listens on right now."""
    return free_ports(1, host)[0]


def check_free(port: int, host: str = HOST) -> None:
    """Raise OSError (its message names the port) unless ``port`` on ``host`` can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise OSError(exc.errno, f"port {port} on {host} is not free: {exc.strerror}") from None
