"""The tutorials' process-per-connection echo server, as they write it: a bench baseline.

Usage: python tutorial_process.py PORT  (listens on every address; SIGTERM stops it, and
bench/run.py kills the connection processes left in its process group)

Line for line the code the tutorials print (``socket()``, ``bind(('', port))``,
``listen(10)``, a ``multiprocessing.Process`` per connection looping on ``recv(1024)`` and
``send``), nothing added. The parent never closes its copy of a connection: the copy goes
when ``conn`` is bound to the next accepted socket (``Process.start()`` drops its reference
to the arguments), so the connection accepted last keeps its descriptor in the parent, and
its client sees no end of the echo (FIN) until another client connects. Finished children
are reaped by ``multiprocessing`` at the next ``Process.start()``. The fork start method is
asked for by name: it is Linux's default up to Python 3.13, not after.
bench/baselines/classic_process.py is the stronger process baseline (``os.fork``, the
parent closing its copy).
"""

import multiprocessing
import socket
import sys


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
    s.listen(10)
    fork = multiprocessing.get_context("fork")
    while True:
        conn, _addr = s.accept()
        fork.Process(target=func, args=(conn,)).start()


if __name__ == "__main__":
    main()
