"""Failed key attempts: counted by reason, logged at most once a minute per client address.

A client guessing keys must be visible to the operator, but must not be able to flood the log
(or its disk) by guessing faster; the key it tried is never logged.
"""

from __future__ import annotations

import logging
from time import monotonic

from gateway.metrics import Metrics

log = logging.getLogger("gateway.auth")

LOG_EVERY = 60.0
MAX_ADDRESSES = 4096  # addresses remembered at once


class AuthFailures:
    def __init__(self, metrics: Metrics, every: float = LOG_EVERY) -> None:
        self.metrics = metrics
        self.every = every
        self.logged: dict[str, float] = {}  # address -> when its last failure was logged

    def failed(self, address: str | None, reason: str) -> None:
        self.metrics.child(self.metrics.auth_failures, reason).inc()
        address = address or "-"
        now = monotonic()
        last = self.logged.get(address)
        if last is not None and now - last < self.every:
            return
        if len(self.logged) >= MAX_ADDRESSES:  # forget what is past its minute
            self.logged = {a: t for a, t in self.logged.items() if now - t < self.every}
            if len(self.logged) >= MAX_ADDRESSES:
                return  # every slot is a live address: counted, not logged
        self.logged[address] = now
        log.warning(
            "API key refused (%s) for a client at %s; further failures from it are counted in "
            "gateway_auth_failures_total, and logged again after %g s",
            reason,
            address,
            self.every,
        )
