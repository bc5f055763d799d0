"""The supervisor's HTTP endpoint (setting ``metrics``): ``/metrics`` and ``/healthz``.

:class:`echod.httpserve.MetricsServer` does the HTTP, on the supervisor's selector; this
module keeps it listening where the configuration says, across reloads. What a scrape shows
and what the health check answers are given as plain callables (the exposition of the
daemon's snapshot, and its health word): the endpoint reads nothing else.
"""

from __future__ import annotations

import selectors
from collections.abc import Callable
from typing import Any

from echod import events, metrics
from echod.config import Config, split_endpoint
from echod.errors import OperatorError
from echod.httpserve import MetricsServer


class Endpoint:
    """Methods for the caller: :meth:`open`, :meth:`reconfigure` on a reload,
    :meth:`close`; :attr:`server` takes the selector's events, deadlines and timers."""

    def __init__(
        self,
        render: Callable[[], bytes],
        health: Callable[[], str],
        logger: Callable[[], Any],
    ) -> None:
        self.render = render
        self.health = health
        self.logger = logger
        self.address: str | None = None
        self.server: MetricsServer | None = None

    def open(self, cfg: Config, selector: selectors.BaseSelector) -> None:
        """Listen where ``cfg.metrics`` says (nothing when it is null). Raises
        OperatorError when the address cannot be bound."""
        if cfg.metrics is None:
            return
        host, port = split_endpoint(cfg.metrics)
        server = MetricsServer(host, port, self.render, self.health)
        server.open(selector)
        metrics.preload()  # now, so that the first scrape does not stall the loop
        self.server, self.address = server, cfg.metrics

    def reconfigure(self, cfg: Config, selector: selectors.BaseSelector) -> None:
        """A reload changed ``metrics``: listen at the new address, then let the old go; if
        it cannot be bound, keep the old one and say so."""
        if cfg.metrics == self.address:
            return
        old, old_address = self.server, self.address
        try:
            self.server, self.address = None, None
            self.open(cfg, selector)
        except OperatorError as exc:
            self.logger().error(events.METRICS_UNAVAILABLE, error=str(exc), kept=old_address)
            self.server, self.address = old, old_address
            return
        if old is not None:
            old.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def close_in_child(self) -> None:
        """In a new worker: the listening socket is the supervisor's alone."""
        if self.server is not None:
            self.server.close_in_child()

    def addresses(self) -> list[str]:
        return self.server.addresses() if self.server is not None else []

    def deadline(self) -> float | None:
        return self.server.next_deadline() if self.server is not None else None

    def run_timers(self, now: float) -> None:
        if self.server is not None:
            self.server.run_timers(now)
