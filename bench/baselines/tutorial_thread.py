"""The tutorials' thread-per-connection echo server, as they write it: a bench baseline.

Usage: python tutorial_thread.py PORT  (listens on every address; SIGTERM stops it)

Line for line the code the tutorials print (``socket()``, ``bind(('', port))``,
``listen(1000)``, a ``threading.Thread`` per connection looping on ``recv(1024)`` and
``send``), nothing added: no ``sendall``, no ``with``, no exception handling, no options.
bench/baselines/classic_thread.py is the same server written with those habits; bench/notes.md
says what the difference costs. ``send`` on a blocking socket returns once all of its at most
1,024 bytes are queued (only a signal or SO_SNDTIMEO could cut it short, and the thread gets
neither), so every byte is echoed, as the load generator checks.
"""

import socket
import sys
import threading


def func(conn):
    while True:
        data = conn.recv(1024)
        if data:
            conn.send(data)
        else:
            conn.close()
            return


def main() -> None:
    port = int(sys.argv[1])
    s = socket.socket()
    s.bind(("", port))
    s.listen(1000)
    while True:
        conn, _addr = s.accept()
        threading.Thread(target=func, args=(conn,)).start()


if __name__ == "__main__":
    main()
