"""Ports the harness chooses lie below the kernel's ephemeral range, so that no
outgoing connection takes one while its server is down (a daemon restarted on
its port, a stopped local cluster started again)."""

from __future__ import annotations

import socket

from kvstore.harness import ports


def test_chosen_ports_are_free_distinct_and_below_the_ephemeral_range():
    chosen = ports.free_ports(50)
    assert len(set(chosen)) == 50
    below = ports._below_ephemeral()
    if below is not None:  # Linux: read from /proc
        assert all(port in below for port in chosen)
    for port in chosen[:5]:
        with socket.socket() as s:
            s.bind((ports.HOST, port))


def test_a_taken_port_is_never_chosen(monkeypatch):
    with socket.socket() as taken:
        taken.bind((ports.HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(ports, "_below_ephemeral", lambda: range(port, port + 2))
        assert port not in ports.free_ports(3)  # port + 1, or the kernel's choice once the range is exhausted
