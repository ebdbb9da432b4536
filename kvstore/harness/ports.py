"""Free TCP ports on loopback, chosen before the server that will listen on them starts."""

from __future__ import annotations

import random
import socket

HOST = "127.0.0.1"


# Ports the kernel hands out for outgoing connections (and for binds to port 0).
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
# Where chosen ports come from: below the ephemeral range, so that no outgoing
# connection takes one while its server is down (a daemon restarted on the same
# port, a stopped cluster started again) and no bind to port 0 lands on it.
LOWEST = 20000
MAX_TRIES = 1000  # then the kernel's choice (port 0), as where there is no such range


def _below_ephemeral() -> range | None:
    try:
        with open(EPHEMERAL_RANGE_FILE) as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(LOWEST, low) if low - LOWEST >= 1000 else None


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct ports on ``host`` that nothing listens on right now,
    outside the kernel's ephemeral range where it has one.

    They are bound together before any is released, so they differ; another
    program may still take one before its server binds it."""
    candidates = _below_ephemeral()
    socks = []
    tries = 0
    try:
        while len(socks) < count:
            tries += 1
            port = random.choice(candidates) if candidates and tries <= MAX_TRIES else 0
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, port))
            except OSError:
                s.close()  # taken: another try (the range holds thousands)
                continue
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
