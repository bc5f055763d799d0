"""The classic process-per-connection (fork) echo server of the tutorials: a bench baseline.

Usage: python classic_process.py PORT  (listens on 127.0.0.1; SIGTERM stops it)
"""

from __future__ import annotations

import os
import socket
import sys


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


def reap() -> None:
    """Collect exited children without blocking.

    waitpid, not SIGCHLD = SIG_IGN: only a waited-for child's CPU time is added to the parent's
    cutime/cstime, which the harness reads.
    """
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main() -> None:
    port = int(sys.argv[1])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen()
        while True:
            conn, _ = srv.accept()
            if os.fork() == 0:
                srv.close()
                try:
                    handle(conn)
                finally:
                    os._exit(0)
            conn.close()
            reap()


if __name__ == "__main__":
    main()
