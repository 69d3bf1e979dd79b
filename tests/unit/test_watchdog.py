"""The watchdog's deadline on a blocked read (a socket pair stands in for libpq's
connection: the real one is in tests/acceptance/test_blackhole.py)."""

from __future__ import annotations

import socket
import time

from outbox_bridge import watchdog
from outbox_bridge.config import Settings
from outbox_bridge.db import network_options, network_params


def _watched_past(moment: float, timeout: float = 10) -> None:
    """Wait until the watchdog has looked at its connections after ``moment``."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        if seen is not None and watchdog.sweeps > seen:
            return
        if seen is None and time.monotonic() >= moment:
            seen = watchdog.sweeps
        time.sleep(0.05)
    raise AssertionError("the watchdog did not look in time")


class _Conn:
    """What ``guard`` needs of a connection: its socket's fd."""

    closed = False

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()


def test_a_read_that_waits_past_the_deadline_is_ended():
    ours, peer = socket.socketpair()  # the peer never answers, never closes
    try:
        started = time.monotonic()
        with watchdog.guard(_Conn(ours), 0.5, "test"):
            data = ours.recv(10)  # blocks until the watchdog shuts the socket down
        waited = time.monotonic() - started
        assert data == b"" and 0.5 <= waited < 3
    finally:
        ours.close()
        peer.close()


def test_paused_time_does_not_count_and_the_deadline_starts_again_after_it():
    ours, peer = socket.socketpair()
    try:
        conn = _Conn(ours)
        with watchdog.guard(conn, 0.6, "test"):
            fired = watchdog.fired
            with watchdog.paused():  # user code, longer than the deadline
                _watched_past(time.monotonic() + 1.5)
            assert watchdog.fired == fired
            peer.sendall(b"x")
            assert ours.recv(1) == b"x"  # still open
            started = time.monotonic()
            assert ours.recv(1) == b""  # then the deadline ends this wait
            assert time.monotonic() - started >= 0.4
    finally:
        ours.close()
        peer.close()


def test_a_block_that_ends_in_time_leaves_the_socket_alone():
    ours, peer = socket.socketpair()
    try:
        with watchdog.guard(_Conn(ours), 0.5, "test"):
            peer.sendall(b"y")
            assert ours.recv(1) == b"y"
        _watched_past(time.monotonic() + 1.2)  # past the deadline, after the block
        peer.sendall(b"z")
        assert ours.recv(1) == b"z"
    finally:
        ours.close()
        peer.close()


def test_network_timeout_sets_libpq_and_server_deadlines():
    p = network_params(30)
    assert p == {
        "connect_timeout": 10,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 3,
        "keepalives_count": 3,
        "tcp_user_timeout": 30000,
    }
    assert "-c tcp_user_timeout=30000" in network_options(30)
    assert network_options(0) == () and network_params(0) == {"connect_timeout": 10}


def test_the_database_urls_own_settings_win(monkeypatch):
    import psycopg2

    from outbox_bridge import db

    seen = {}
    monkeypatch.setattr(psycopg2, "connect", lambda **kw: seen.update(kw) or _Fake())
    url = "postgresql://u@h:5/d?keepalives_idle=99&connect_timeout=4&options=-c%20work_mem%3D8MB"
    db.connect(Settings(database_url=url, network_timeout=12))
    assert seen["keepalives_idle"] == "99" and seen["connect_timeout"] == "4"
    assert seen["tcp_user_timeout"] == 12000
    # ours first, the URL's after (a later -c wins), ours for the transaction timeout last
    assert seen["options"].index("tcp_keepalives_idle=4") < seen["options"].index("work_mem")


class _Fake:
    autocommit = False
