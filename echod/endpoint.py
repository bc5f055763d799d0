"""The supervisor's HTTP endpoint (setting ``metrics``): ``/metrics`` from the workers' summed
counters and the supervisor's own facts, ``/healthz`` from ``Supervisor.health()``.

:class:`echod.httpserve.MetricsServer` does the HTTP, on the supervisor's selector; this
module connects it to the supervisor: what a scrape shows, and a reload that moves it.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from echod import metrics
from echod.config import Config, split_endpoint
from echod.errors import OperatorError
from echod.httpserve import MetricsServer
from echod.states import SupervisorState

if TYPE_CHECKING:
    import selectors

    from echod.supervisor import Supervisor


class Endpoint:
    """Methods for the caller: :meth:`open`, :meth:`reconfigure` on a reload,
    :meth:`close`; :attr:`server` takes the selector's events, deadlines and timers."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor
        self.address: str | None = None
        self.server: MetricsServer | None = None

    def open(self, cfg: Config, selector: selectors.BaseSelector) -> None:
        """Listen where ``cfg.metrics`` says (nothing when it is null). Raises
        OperatorError when the address cannot be bound."""
        if cfg.metrics is None:
            return
        host, port = split_endpoint(cfg.metrics)
        server = MetricsServer(host, port, self.render, self.sup.health)
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
            self.sup.log.error("metrics_unavailable", error=str(exc), kept=old_address)
            self.server, self.address = old, old_address
            return
        if old is not None:
            old.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def addresses(self) -> list[str]:
        return self.server.addresses() if self.server is not None else []

    def render(self) -> bytes:
        sup = self.sup
        pool = sup.pool
        facts = metrics.SupervisorFacts(
            open_connections=pool.open_now(),
            workers=dict(Counter(h.state.value for h in pool.workers.values())),
            worker_restarts=pool.restarts,
            reloads_ok=sup.reload_outcome.ok_count,
            reloads_failed=sup.reload_outcome.failed_count,
            draining=sup.state is SupervisorState.DRAINING,
            start_time=sup.started_wall,
        )
        return metrics.render(sup.totals.snapshot(), facts)
