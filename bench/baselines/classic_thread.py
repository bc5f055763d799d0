"""The classic thread-per-connection echo server of the tutorials: a baseline for bench/run.py.

Usage: python classic_thread.py PORT  (listens on 127.0.0.1; SIGTERM stops it)
"""

from __future__ import annotations

import socket
import sys
import threading


def handle(conn: socket.socket) -> None:
    with conn:
        try:
            while True:
                data = conn.recv(1024)
                if not data:
                    break
                # sendall where the tutorials write send(): send() may write only part of the
                # data, and the load generator verifies every echoed byte.
                conn.sendall(data)
        except ConnectionError:
            pass


def main() -> None:
    port = int(sys.argv[1])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen()
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
