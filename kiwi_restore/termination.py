"""End of contract operations: termination letter, reversibility request, early deletion
request, legal holds, and the status that shows every date. Each change is audited."""

from __future__ import annotations

from dataclasses import dataclass

from . import lifecycle
from .errors import PolicyError, UsageError
from .i18n import _
from .site import ContractRecord, Site


def _update(site: Site, name: str, fn) -> ContractRecord:
    with site.registry_lock():
        rec = site.contract(name)
        fn(rec)
        site.save_contract(rec)
    return rec


def _not_purged(rec: ContractRecord) -> None:
    if (rec.lifecycle.get("purge") or {}).get("started"):
        raise PolicyError(_("contract {name} is being or has been purged").format(name=rec.name))


def window_days(site: Site, offer: str) -> int:
    return int(site.config["offers"][offer]["restore_window_days"])


def terminate(site: Site, name: str, letter: str, notice_months: int | None = None) -> ContractRecord:
    d = lifecycle.parse_date(letter)
    if d.isoformat() > lifecycle.paris_date(site.clock.iso()).isoformat():
        raise UsageError(_("the letter's date {d} is in the future").format(d=d))
    months = notice_months if notice_months is not None else int(site.config.get("notice_months", 3))

    def fn(rec: ContractRecord) -> None:
        _not_purged(rec)
        if rec.lifecycle.get("schedule"):
            raise UsageError(_("contract {name} is already terminated (letter of {d})").format(
                name=rec.name, d=rec.lifecycle["schedule"]["letter_received"]))
        sched = lifecycle.schedule(d, months, window_days(site, rec.offer))
        rec.lifecycle["schedule"] = sched.to_json() | {"notice_months": months}
        rec.lifecycle["terminated_recorded"] = site.clock.iso()

    rec = _update(site, name, fn)
    site.audit.append("contract.terminate", contract=rec.id, details=rec.lifecycle["schedule"])
    return rec


def request_reversibility(site: Site, name: str, requested: str, force: bool) -> ContractRecord:
    d = lifecycle.parse_date(requested)

    def fn(rec: ContractRecord) -> None:
        _not_purged(rec)
        sched = rec.lifecycle.get("schedule")
        if not sched:
            raise UsageError(_("record the termination letter first (contract terminate)"))
        late = d.isoformat() > sched["reversibility_request_deadline"]
        if late and not force:
            raise PolicyError(_("reversibility request of {d} is late: it had to reach the provider by {dl} "
                                "(1 month after the letter, Art. 18.1); use --force to accept it anyway")
                              .format(d=d, dl=sched["reversibility_request_deadline"]))
        rec.lifecycle["reversibility"] = {"requested": d.isoformat(), "recorded": site.clock.iso(),
                                          "late": late, "forced": bool(late and force)}

    rec = _update(site, name, fn)
    site.audit.append("contract.reversibility_request", "forced" if rec.lifecycle["reversibility"]["forced"] else "ok",
                      rec.id, rec.lifecycle["reversibility"])
    return rec


def request_destruction(site: Site, name: str) -> ContractRecord:
    def fn(rec: ContractRecord) -> None:
        _not_purged(rec)
        rec.lifecycle["destroy_requested"] = site.clock.iso()

    rec = _update(site, name, fn)
    site.audit.append("contract.destroy_request", contract=rec.id, details={"requested": rec.lifecycle["destroy_requested"]})
    return rec


def hold(site: Site, name: str, reason: str) -> ContractRecord:
    if not reason.strip():
        raise UsageError(_("a legal hold needs a reason"))

    def fn(rec: ContractRecord) -> None:
        _not_purged(rec)
        rec.lifecycle.setdefault("holds", []).append({"reason": reason, "placed": site.clock.iso()})

    rec = _update(site, name, fn)
    site.audit.append("contract.hold", contract=rec.id, details={"reason": reason})
    # Art. 19.3: the client is notified in writing of a judicial request; record the duty
    site.audit.append("client.notification_due", contract=rec.id,
                      details={"about": "legal hold (Art. 19.3)", "reason": reason})
    return rec


def release(site: Site, name: str) -> ContractRecord:
    def fn(rec: ContractRecord) -> None:
        if not rec.lifecycle.get("holds"):
            raise UsageError(_("contract {name} has no legal hold").format(name=rec.name))
        rec.lifecycle.setdefault("released_holds", []).extend(
            h | {"released": site.clock.iso()} for h in rec.lifecycle.pop("holds"))

    rec = _update(site, name, fn)
    site.audit.append("contract.release", contract=rec.id)
    return rec


@dataclass
class Status:
    name: str
    offer: str
    state: str
    schedule: dict | None
    reversibility: dict | None
    destroy_requested: str | None
    holds: list
    next_due: str
    data_act_flag: bool
    purge: dict | None

    def to_json(self) -> dict:
        return dict(self.__dict__)


def status(site: Site, name: str) -> Status:
    rec = site.contract(name)
    lc = rec.lifecycle
    now = site.clock.iso()
    st = lifecycle.state(lc, now)
    sched = lc.get("schedule")
    flag = window_days(site, rec.offer) < lifecycle.DATA_ACT_MIN_RETRIEVAL_DAYS
    if st == "active":
        nxt = _("nothing scheduled (no termination letter recorded)")
    elif st == "terminated":
        nxt = _("end of contract on {d}; restores stay open until {w} inclusive").format(
            d=sched["end_of_contract"], w=sched["restore_window_last_day"])
    elif st == "restore-window":
        nxt = _("restore window open until {w} inclusive; deletion due from {c}").format(
            w=sched["restore_window_last_day"], c=sched["window_closes_at"])
    elif st == "deletion-due":
        nxt = _("deletion due now: the next 'purge --due' destroys every copy")
    elif st == "held":
        nxt = _("deletion due but blocked by a legal hold")
    elif st == "purging":
        nxt = _("purge started, not finished: the next 'purge --due' completes it")
    else:
        nxt = _("purged; certificate {id}").format(id=lc["purge"].get("certificate_id"))
    return Status(rec.name, rec.offer, st, sched, lc.get("reversibility"), lc.get("destroy_requested"),
                  lc.get("holds", []), nxt, flag, lc.get("purge"))
