"""A loopback TCP proxy that can go silent: the soak's and the tests' blackhole.

``silence()`` stops forwarding in both directions while every socket stays
open, as a dropped route, a NAT table flush or a paused VM does: nothing is
refused, nothing is closed, nothing arrives. New connections are accepted and
then silent too. ``speak()`` ends the silence for new connections only: the
flows that were open meanwhile stay silent for good (as after a NAT flush,
their state is gone), so a client gets out only by a deadline of its own.
A silent flow whose client closes its end is closed towards the server too,
as the server's keepalives would find (so its backend ends and frees its locks).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time

CHUNK = 65536


class _Flow:
    def __init__(self, client: socket.socket, server: socket.socket, silent: bool):
        self.client, self.server, self.silent = client, server, silent


class Proxy:
    """Forwards ``127.0.0.1:port`` (0: any free port) to ``target`` in a thread."""

    def __init__(self, target: tuple[str, int], port: int = 0):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.flows: set[_Flow] = set()
        self.silent = False
        self.accepted = 0  # connections, for tests: the clients really came through here
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"proxy:{self.port}", daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def silence(self) -> int:
        """Stop forwarding; returns the flows that go silent."""
        with self.lock:
            self.silent = True
            for flow in self.flows:
                flow.silent = True
            return len(self.flows)

    def speak(self) -> None:
        """Forward again, for connections made from now on."""
        with self.lock:
            self.silent = False

    def open_flows(self) -> tuple[int, int]:
        """(forwarding, silent) flows open now."""
        with self.lock:
            silent = sum(1 for f in self.flows if f.silent)
            return len(self.flows) - silent, silent

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        with self.lock:
            for flow in list(self.flows):
                self._end(flow)
        self.listener.close()
        self.sel.close()

    # -- the thread -----------------------------------------------------------
    def _run(self) -> None:
        while not self.stopped.is_set():
            for key, _events in self.sel.select(timeout=0.2):
                with self.lock:
                    if key.data is None:
                        self._accept()
                    else:
                        self._readable(*key.data)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()  # the service is down: refused, as it would be
            return
        self.accepted += 1
        flow = _Flow(client, server, self.silent)
        self.flows.add(flow)
        for sock, other in ((client, server), (server, client)):
            sock.setblocking(False)
            self.sel.register(sock, selectors.EVENT_READ, (flow, sock, other))

    def _readable(self, flow: _Flow, sock: socket.socket, other: socket.socket) -> None:
        if flow not in self.flows:
            return
        if flow.silent and sock is flow.server:
            # the server's words are lost in the silence; it is not read, so it may block
            self.sel.unregister(sock)
            return
        try:
            data = sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._end(flow)  # one end closed: for a silent flow, only the client's can
            return
        if flow.silent:
            return  # the client's words are lost
        try:
            other.setblocking(True)
            other.settimeout(5)
            other.sendall(data)
            other.setblocking(False)
        except OSError:
            self._end(flow)

    def _end(self, flow: _Flow) -> None:
        self.flows.discard(flow)
        for sock in (flow.client, flow.server):
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(sock)
            with contextlib.suppress(OSError):
                sock.close()


def wait_for(condition, timeout: float, step: float = 0.1) -> bool:
    """Whether ``condition()`` became true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return bool(condition())
