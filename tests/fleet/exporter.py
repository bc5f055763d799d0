"""echod's metrics endpoint on its own: ``python -m tests.fleet.exporter HOST:PORT``.

It serves the real exposition (:mod:`echod.metrics`) through the real server
(:mod:`echod.httpserve`) from a selector loop like the supervisor's, with fixed counts, so
that the fleet's smoke test can show a real Prometheus scraping it before the supervisor
serves it itself. It prints ``ready`` once bound and exits 0 on SIGTERM.
"""

from __future__ import annotations

import selectors
import signal
import socket
import sys
import time

from echod import metrics
from echod.config import split_endpoint
from echod.httpserve import MetricsServer

#: What every scrape shows: the smoke test looks for these values in Prometheus.
OPENED = 7
BYTES = 4096


def main(argv: list[str]) -> int:
    host, port = split_endpoint(argv[0])
    counters = metrics.WorkerCounters()
    for _ in range(OPENED):
        counters.opened()
        counters.closed("client_closed", BYTES, BYTES)
    facts = metrics.SupervisorFacts(workers={"running": 1}, start_time=time.time())
    server = MetricsServer(host, port, lambda: metrics.render(counters.snapshot(), facts),
                           lambda: "serving")
    selector = selectors.DefaultSelector()
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    selector.register(wake_r, selectors.EVENT_READ, None)
    server.open(selector)
    print("ready", flush=True)
    while not stopping:
        deadline = server.next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        for key, mask in selector.select(timeout):
            if key.data is not None:
                key.data(key.fileobj, mask)
            else:
                wake_r.recv(64)
        server.run_timers(time.monotonic())
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
