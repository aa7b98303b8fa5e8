"""Per-host politeness: how many images of an origin host may be in flight, and when its
images may be fetched again. The database is the truth, so the limit holds across every
process and machine that claims.

    HostRoom.read(connection, politeness, now)   the room each host has for new claims:
                                                 the limit (1 while its breaker is open)
                                                 less its images being processed, none
                                                 while it backs off
    record_host_answers(connection, ...)         after outcomes: hosts that answered close
                                                 their breaker; hosts in trouble back off
                                                 (Retry-After, capped, or exponential with
                                                 jitter) and count a failure per round

A round is what was claimed between two backoffs: outcomes that arrive while their host
already backs off were claimed before it did, so they may extend the backoff but add no
failure. From FETCH_BREAKER_FAILURES rounds in a row, the host gets one image at a time
(a probe) until one is answered.
"""

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Connection, bindparam, case, func, select, update

from app.db.models import Host, Image
from app.ledger.turns import PROCESSING
from app.ledger.units import ImageOutcome


@dataclass(frozen=True)
class HostPoliteness:
    """The settings of per-host politeness (FETCH_* in app/config.py)."""

    per_host: int = 8
    retry_window_seconds: float = 900.0
    retry_after_max_seconds: float = 600.0
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 120.0
    breaker_failures: int = 5

    def backoff_seconds(self, failures: int, retry_after: float | None, jitter: float) -> float:
        """How long a host backs off after `failures` rounds in a row: what it asked for
        (capped), else base doubling per round, times `jitter` (0.5-1: hosts that failed
        together do not come back together), capped."""
        if retry_after is not None:
            return min(retry_after, self.retry_after_max_seconds)
        exponential = self.backoff_base_seconds * 2 ** min(max(failures - 1, 0), 32)
        return min(self.backoff_max_seconds, exponential) * jitter


# Hosts with trouble: a failure sets backoff_until, an answer clears it, so the partial
# index holds only hosts that failed since they last answered.
_TROUBLED_HOSTS = select(Host.name, Host.backoff_until, Host.consecutive_failures).where(
    Host.backoff_until.is_not(None)
)
_IN_FLIGHT_BY_HOST = (
    select(Image.host, func.count()).where(PROCESSING, Image.host.is_not(None)).group_by(Image.host)
)
# Built once, as the claim statements in turns.py: the claim runs these for every batch.
_THESE_HOSTS = (
    select(Host.name, Host.backoff_until, Host.consecutive_failures)
    .where(Host.name.in_(bindparam("names", expanding=True)))
    .order_by(Host.name)
)
_THESE_HOSTS_LOCKED = _THESE_HOSTS.with_for_update()
_IN_FLIGHT_OF_THESE_HOSTS = (
    select(Image.host, func.count())
    .where(PROCESSING, Image.host.in_(bindparam("names", expanding=True)))
    .group_by(Image.host)
)


@dataclass
class HostRoom:
    """Room for new claims per host, spent as images are picked."""

    per_host: int
    blocked: set[str] = field(default_factory=set)
    room: dict[str, int] = field(default_factory=dict)  # hosts not named have per_host
    passed_over: int = 0  # images take() refused

    @classmethod
    def read(
        cls,
        connection: Connection,
        politeness: HostPoliteness,
        now: datetime,
        hosts: Iterable[str] | None = None,
        *,
        lock: bool = False,
    ) -> "HostRoom":
        """The room of `hosts` (every host when None). With lock (the claim's write
        transaction), their rows are locked first on PostgreSQL, in name order, so claims
        touching a host take turns and each counts what the one before it claimed;
        SQLite's write lock already serialises them."""
        parameters = {}
        troubled, in_flight = _TROUBLED_HOSTS, _IN_FLIGHT_BY_HOST
        if hosts is not None:
            parameters = {"names": sorted(set(hosts))}
            troubled = _THESE_HOSTS_LOCKED if lock else _THESE_HOSTS
            in_flight = _IN_FLIGHT_OF_THESE_HOSTS
        room = cls(politeness.per_host)
        limits: dict[str, int] = {}
        for name, backoff_until, failures in connection.execute(troubled, parameters):
            if backoff_until is not None and backoff_until > now:
                room.blocked.add(name)
            elif failures >= politeness.breaker_failures:
                limits[name] = 1  # the breaker is open: one probe at a time
        counts = dict(connection.execute(in_flight, parameters).all())
        for name in limits.keys() | counts.keys():
            left = limits.get(name, politeness.per_host) - counts.get(name, 0)
            if left <= 0:
                room.blocked.add(name)
            else:
                room.room[name] = left
        return room

    def take(self, host: str | None) -> bool:
        """Whether an image of `host` may be claimed now; takes its place if so."""
        if host is None:  # stored before hosts were kept: no limit
            return True
        if host in self.blocked:
            self.passed_over += 1
            return False
        left = self.room.get(host, self.per_host) - 1
        if left <= 0:
            self.blocked.add(host)
        self.room[host] = left
        return True


_ANSWERED = (
    update(Host.__table__)
    .where(Host.name.in_(bindparam("names", expanding=True)), Host.backoff_until.is_not(None))
    .values(
        consecutive_failures=0,
        last_error_code=None,
        backoff_until=case((Host.backoff_until > bindparam("now"), Host.backoff_until), else_=None),
    )
)
_BACK_OFF = (
    update(Host.__table__)
    .where(Host.name == bindparam("host_name"))
    .values(
        backoff_until=bindparam("new_backoff_until"),
        consecutive_failures=bindparam("new_failures"),
        last_error_code=bindparam("new_error_code"),
    )
)


def record_host_answers(
    connection: Connection,
    politeness: HostPoliteness,
    outcomes: Sequence[ImageOutcome],
    now: datetime,
    *,
    jitter: float | None = None,
) -> tuple[dict[str, datetime], int]:
    """Update the hosts the outcomes came from; returns each troubled host's backoff_until
    (the images that failed wait for it) and how many hosts started a backoff round."""
    answered = sorted(
        {o.unit.host for o in outcomes if o.unit.host and not o.origin_failure and not o.cancelled}
    )
    failed: dict[str, list[ImageOutcome]] = {}
    for outcome in outcomes:
        if outcome.origin_failure and outcome.unit.host is not None:
            failed.setdefault(outcome.unit.host, []).append(outcome)
    if answered:
        # An answer closes the breaker; a backoff the origin asked for still runs out.
        # Only hosts with trouble are touched: the common case writes nothing.
        connection.execute(_ANSWERED, {"names": answered, "now": now})
    if not failed:
        return {}, 0
    names = sorted(failed)
    rows = {
        name: (backoff_until, failures)
        for name, backoff_until, failures in connection.execute(_THESE_HOSTS_LOCKED, {"names": names})
    }
    backoffs: dict[str, datetime] = {}
    rounds = 0
    parameters = []
    for name in names:
        backoff_until, failures = rows.get(name, (None, 0))
        in_backoff = backoff_until is not None and backoff_until > now
        if not in_backoff:
            failures += 1
            rounds += 1
        asked = [o.retry_after_seconds for o in failed[name] if o.retry_after_seconds is not None]
        delay = politeness.backoff_seconds(
            failures, max(asked) if asked else None, random.uniform(0.5, 1.0) if jitter is None else jitter
        )
        until = now + timedelta(seconds=delay)
        if in_backoff and backoff_until >= until:
            until = backoff_until
        backoffs[name] = until
        parameters.append(
            {
                "host_name": name,
                "new_backoff_until": until,
                "new_failures": failures,
                "new_error_code": failed[name][-1].error_code,
            }
        )
    connection.execute(_BACK_OFF, parameters)
    return backoffs, rounds


_NEXT_HOST_BACK = (
    select(Host.backoff_until)
    .where(Host.backoff_until > bindparam("now"))
    .order_by(Host.backoff_until)
    .limit(1)
)
_HOSTS_IN_BACKOFF = select(func.count()).select_from(Host).where(Host.backoff_until > bindparam("now"))


def next_host_back(connection: Connection, now: datetime) -> datetime | None:
    """When the first host in backoff may be fetched from again; None when none backs off."""
    return connection.scalar(_NEXT_HOST_BACK, {"now": now})


def hosts_in_backoff(connection: Connection, now: datetime) -> int:
    return connection.scalar(_HOSTS_IN_BACKOFF, {"now": now}) or 0
