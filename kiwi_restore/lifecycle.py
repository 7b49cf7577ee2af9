"""Contract lifecycle dates (Art. 16-18): end of contract, restore window, deletion due.

Calendar months follow the French rule for time limits in months (Code de procédure
civile, art. 641): the limit falls on the same day of the month, or on the month's last
day when that day does not exist (letter on 30 November + 3 months -> 28/29 February).
Day boundaries are in Europe/Paris: the restore window stays open through its last day
and closes at the following midnight, Paris time.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from .errors import UsageError
from .i18n import _

PARIS = ZoneInfo("Europe/Paris")
DATA_ACT_MIN_RETRIEVAL_DAYS = 30  # Regulation (EU) 2023/2854, Art. 25(2)(g)
REVERSIBILITY_REQUEST_MONTHS = 1  # Art. 18.1


def add_months(d: date, months: int) -> date:
    month0 = d.month - 1 + months
    year, month = d.year + month0 // 12, month0 % 12 + 1
    return date(year, month, min(d.day, calendar.monthrange(year, month)[1]))


def parse_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise UsageError(_("invalid date {text!r} (expected YYYY-MM-DD)").format(text=text)) from None


def paris_midnight_utc(d: date) -> str:
    """The instant Paris midnight starting day D, as an ISO UTC string (comparable as text)."""
    local = datetime.combine(d, time(0, 0), tzinfo=PARIS)
    return local.astimezone(ZoneInfo("UTC")).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def paris_date(instant_iso: str) -> date:
    t = datetime.fromisoformat(instant_iso.replace("Z", "+00:00"))
    return t.astimezone(PARIS).date()


@dataclass(frozen=True)
class Schedule:
    letter_received: date
    end_of_contract: date  # letter + notice (Art. 17)
    window_days: int
    window_last_day: date  # restores still possible through this day
    window_closes_at: str  # ISO UTC instant: deletion is due from then
    reversibility_deadline: date  # last day to ask for reversibility (Art. 18.1)
    info_pack_due: date  # info to prepare reversibility, 3 months before expiry (Art. 18.1)

    @property
    def data_act_short(self) -> bool:
        return self.window_days < DATA_ACT_MIN_RETRIEVAL_DAYS

    def to_json(self) -> dict:
        return {
            "letter_received": self.letter_received.isoformat(),
            "end_of_contract": self.end_of_contract.isoformat(),
            "restore_window_days": self.window_days,
            "restore_window_last_day": self.window_last_day.isoformat(),
            "window_closes_at": self.window_closes_at,
            "reversibility_request_deadline": self.reversibility_deadline.isoformat(),
            "reversibility_info_due": self.info_pack_due.isoformat(),
            "data_act_window_below_30_days": self.data_act_short,
        }


def schedule(letter_received: date, notice_months: int, window_days: int) -> Schedule:
    """End of contract = letter + notice (calendar months); the window runs WINDOW_DAYS after it."""
    end = add_months(letter_received, notice_months)
    last = end + timedelta(days=window_days)
    return Schedule(
        letter_received=letter_received,
        end_of_contract=end,
        window_days=window_days,
        window_last_day=last,
        window_closes_at=paris_midnight_utc(last + timedelta(days=1)),
        reversibility_deadline=add_months(letter_received, REVERSIBILITY_REQUEST_MONTHS),
        info_pack_due=max(add_months(end, -3), letter_received),
    )


def state(lifecycle: dict, now_iso: str) -> str:
    """active, terminated (notice running), restore-window, deletion-due, held, purging, purged."""
    purge = lifecycle.get("purge") or {}
    if purge.get("certificate"):
        return "purged"
    due = deletion_due(lifecycle, now_iso)
    if lifecycle.get("holds") and due:
        return "held"
    if purge.get("started"):
        return "purging"
    if due:
        return "deletion-due"
    sched = lifecycle.get("schedule")
    if not sched:
        return "active"
    if now_iso < paris_midnight_utc(date.fromisoformat(sched["end_of_contract"])):
        return "terminated"
    return "restore-window"


def deletion_due(lifecycle: dict, now_iso: str) -> bool:
    if lifecycle.get("destroy_requested"):
        return True
    sched = lifecycle.get("schedule")
    return bool(sched) and now_iso >= sched["window_closes_at"]
