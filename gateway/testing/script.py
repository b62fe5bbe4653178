"""How a test scripts the fake model service's (mis)behaviour, and what it recorded."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Script:
    """How the fake model service answers; tests mutate ``fake.script`` between requests.

    ``stall_after`` and ``reset_after`` count ``data:`` events written on the wire: the role chunk
    is event 1, so 0 means "after the headers, before any event". For a non-streaming request
    either one, when set, applies before the headers (stall: never answer; reset: abort).
    """

    events: int = 5
    interval: float = 0.0
    header_delay: float = 0.0
    stall_after: int | None = None
    reset_after: int | None = None
    split_events: bool = False
    split_pause: float = 0.0
    payload_size: int = 0
    status: int | None = None


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake model service received it (multi-valued headers joined)."""

    method: str
    path: str
    query_string: str
    headers: dict[str, str]
    body: bytes
