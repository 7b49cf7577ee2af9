"""The one clock all date logic goes through (DESIGN.md "Time").

An override (a fixed instant, or an offset from real time) is for tests and demos only:
it is refused on a production site and recorded in the audit trail and any certificate.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from .errors import PolicyError, UsageError

ENV_VAR = "KIWI_RESTORE_CLOCK"


@dataclass(frozen=True)
class Clock:
    override: str | None = None  # as given: an ISO time, or "+<days>d"

    def now_ns(self) -> int:
        if self.override is None:
            return time.time_ns()
        text = self.override
        if text.startswith("+") and text.endswith("d"):
            try:
                days = float(text[1:-1])
            except ValueError:
                raise UsageError(f"invalid clock override {text!r}") from None
            return time.time_ns() + int(days * 86400e9)
        try:
            t = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(f"invalid clock override {text!r}") from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
        return int(t.timestamp() * 1e6) * 1000

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.now_ns() / 1e9, UTC)

    def iso(self) -> str:
        return self.now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def site_clock(production: bool) -> Clock:
    override = os.environ.get(ENV_VAR) or None
    if override and production:
        raise PolicyError(f"{ENV_VAR} is set, but a clock override is refused on a production site")
    return Clock(override)
