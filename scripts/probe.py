#!/usr/bin/env python3
"""Readiness probes that speak each protocol, using only the standard library.

    probe.py amqp HOST PORT    AMQP 0-9-1 handshake: the server sends Connection.Start
    probe.py kafka HOST PORT   Kafka Metadata request: at least one broker answers

Exit 0 when the service answers, 1 otherwise (the reason on stderr). The
services script runs this before any Python package is installed.
"""

import socket
import struct
import sys


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the server")
        data += chunk
    return data


def amqp(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=3) as sock:
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        frame_type, channel, size = struct.unpack(">BHI", _recv_exact(sock, 7))
        payload = _recv_exact(sock, size)
        class_id, method_id = struct.unpack(">HH", payload[:4])
        if (frame_type, channel, class_id, method_id) != (1, 0, 10, 10):
            raise ConnectionError("no AMQP Connection.Start from the server")


def kafka(host: str, port: int) -> None:
    client = b"outbox-bridge-probe"
    # Metadata v0 with an empty topic list: api_key 3, version 0, correlation 1.
    body = struct.pack(">hhih", 3, 0, 1, len(client)) + client + struct.pack(">i", 0)
    with socket.create_connection((host, port), timeout=3) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        response = _recv_exact(sock, size)
        correlation, brokers = struct.unpack(">ii", response[:8])
        if correlation != 1 or brokers < 1:
            raise ConnectionError("Kafka metadata lists no broker yet")


def main() -> int:
    kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        {"amqp": amqp, "kafka": kafka}[kind](host, port)
    except (OSError, ConnectionError, struct.error) as exc:
        print(f"{kind} at {host}:{port} not ready: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
