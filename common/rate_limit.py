"""Bandwidth limit of one agent: a token bucket shared by all its disks, changeable at runtime,
optionally following a time-of-day schedule.

Rules it keeps:
- The bucket (:class:`TokenBucket`) and the schedule (:func:`limit_at`) are pure: time
  is passed in, so tests drive them without sleeping.
- Over any long interval the bytes let through are at most ``rate * time + burst``;
  a batch larger than the burst is let through whole and paid back afterwards (debt),
  so a limit never splits or stalls a batch forever.
- A new limit (reload, schedule boundary) takes effect for waiting senders within
  one second; ``0`` / ``None`` means unlimited.
- Waiters are served in order (one lock), so one disk cannot starve the others.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from common.aio import wait_event
from common.units import parse_size

MAX_WAIT_STEP = 1.0  # re-read the limit at least this often while waiting
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$|^24:00$")


class TokenBucket:
    """``rate`` bytes per second, at most ``burst`` bytes saved up. Pure: ``now`` is passed in."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def set_rate(self, rate: float, burst: float, now: float) -> None:
        self._refill(now)
        self.rate, self.burst = float(rate), float(burst)
        self.tokens = min(self.tokens, self.burst)

    def delay(self, now: float) -> float:
        """Seconds until a send may start (0 when the bucket is not in debt)."""
        self._refill(now)
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def take(self, nbytes: int, now: float) -> None:
        """Spend ``nbytes`` (may go into debt, repaid before the next send)."""
        self._refill(now)
        self.tokens -= nbytes


# ----------------------------------------------------------------- schedule


@dataclass(frozen=True)
class ScheduleEntry:
    """From ``start`` to ``end`` (minutes after midnight, local time) on ``days``, limit ``rate``
    bytes per second (0 = unlimited). ``end < start`` wraps past midnight."""

    start: int
    end: int
    rate: int
    days: frozenset[int] = frozenset(range(7))

    def covers(self, when: _dt.datetime) -> bool:
        minute = when.hour * 60 + when.minute
        day = when.weekday()
        if self.start <= self.end:
            return day in self.days and self.start <= minute < self.end
        # wraps midnight: the evening belongs to `day`, the early morning to the day before
        if minute >= self.start:
            return day in self.days
        return minute < self.end and (day - 1) % 7 in self.days


def _minutes(text: Any) -> int:
    if not isinstance(text, str) or not _HHMM.match(text):
        raise ValueError(f'expected a time "HH:MM" (00:00 to 24:00), got {text!r}')
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def _days(text: Any) -> frozenset[int]:
    if not isinstance(text, str) or not text:
        raise ValueError(f'expected days like "mon-fri" or "sat,sun", got {text!r}')
    out: set[int] = set()
    for part in text.lower().split(","):
        part = part.strip()
        lo, _, hi = part.partition("-")
        if lo not in DAYS or (hi and hi not in DAYS):
            raise ValueError(f'expected days like "mon-fri" or "sat,sun", got {text!r}')
        a, b = DAYS.index(lo), DAYS.index(hi or lo)
        i = a
        while True:
            out.add(i)
            if i == b:
                break
            i = (i + 1) % 7
    return frozenset(out)


def parse_rate(value: Any) -> int:
    """A bandwidth in bytes per second: ``"10MiB"``, ``"100Mbit"``, ``1048576``, ``0``
    (unlimited). Raises ValueError."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgG]?)bit(?:/s)?\s*", value)
        if m:
            scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
            return int(float(m.group(1)) * scale / 8)
        value = value.strip().removesuffix("/s")
    rate = parse_size(value)
    if rate and rate < 4096:
        raise ValueError(f"a bandwidth limit below 4 KiB/s is not useful, got {rate} bytes/s")
    return rate


def parse_schedule(value: Any) -> tuple[ScheduleEntry, ...]:
    """``[{from = "08:00", to = "18:00", limit = "10MiB", days = "mon-fri"}, ...]``.
    Raises ValueError naming the entry."""
    if not isinstance(value, list):
        raise ValueError("expected an array of tables {from, to, limit[, days]}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"entry {i}: expected a table {{from, to, limit[, days]}}")
        unknown = sorted(set(item) - {"from", "to", "limit", "days"})
        if unknown:
            raise ValueError(f"entry {i}: unknown key {unknown[0]!r}")
        for key in ("from", "to", "limit"):
            if key not in item:
                raise ValueError(f"entry {i}: missing {key!r}")
        try:
            entry = ScheduleEntry(
                start=_minutes(item["from"]),
                end=_minutes(item["to"]),
                rate=parse_rate(item["limit"]),
                days=_days(item["days"]) if "days" in item else frozenset(range(7)),
            )
        except ValueError as exc:
            raise ValueError(f"entry {i}: {exc}") from exc
        if entry.start == entry.end:
            raise ValueError(f"entry {i}: 'from' and 'to' are equal")
        out.append(entry)
    return tuple(out)


def limit_at(default: int, schedule: Sequence[ScheduleEntry], when: _dt.datetime) -> int:
    """The limit (bytes/s, 0 unlimited) in force at local time ``when``: the first schedule
    entry that covers it, else ``default``."""
    for entry in schedule:
        if entry.covers(when):
            return entry.rate
    return default


# ----------------------------------------------------------------- the async limiter


class BandwidthLimiter:
    """The asyncio face of :class:`TokenBucket`, with a default limit and a schedule."""

    def __init__(
        self,
        default: int = 0,
        schedule: Sequence[ScheduleEntry] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], _dt.datetime] = _dt.datetime.now,
    ) -> None:
        self._clock, self._wall = clock, wall
        self.default, self.schedule = default, tuple(schedule)
        self.override: int | None = None  # set at runtime (admin), cleared by a reload
        self._bucket: TokenBucket | None = None
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self.bytes_total = 0
        self.throttled_seconds = 0.0  # finished waits; a wait in progress is added by status()
        self._waiting_since: float | None = None

    def configure(self, default: int, schedule: Sequence[ScheduleEntry] = ()) -> None:
        """New limits from a (re)loaded configuration; waiting senders see them at once."""
        self.default, self.schedule, self.override = default, tuple(schedule), None
        self._changed.set()

    def set_override(self, rate: int | None) -> None:
        """A runtime limit that wins over the configuration until the next reload."""
        self.override = rate
        self._changed.set()

    def current_rate(self) -> int:
        """Bytes per second in force now (0 = unlimited)."""
        if self.override is not None:
            return self.override
        return limit_at(self.default, self.schedule, self._wall())

    def _bucket_for(self, rate: int, now: float) -> TokenBucket:
        burst = max(rate, 256 << 10)  # one second of traffic, at least 256 KiB
        if self._bucket is None:
            self._bucket = TokenBucket(rate, burst, now)
        elif self._bucket.rate != rate:
            self._bucket.set_rate(rate, burst, now)
        return self._bucket

    async def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be sent under the limit in force."""
        self.bytes_total += nbytes
        if not self.default and not self.schedule and self.override in (None, 0):
            return  # unlimited: no lock, no clock
        async with self._lock:
            started = self._waiting_since = self._clock()
            try:
                while True:
                    rate = self.current_rate()
                    now = self._clock()
                    if rate <= 0:
                        break
                    bucket = self._bucket_for(rate, now)
                    delay = bucket.delay(now)
                    if delay <= 0:
                        bucket.take(nbytes, now)
                        break
                    self._changed.clear()
                    await wait_event(self._changed, min(delay, MAX_WAIT_STEP))
            finally:  # also when the sender is cancelled (link lost)
                self.throttled_seconds += self._clock() - started
                self._waiting_since = None

    def status(self) -> dict[str, Any]:
        waiting = self._clock() - self._waiting_since if self._waiting_since is not None else 0.0
        return {
            "limit_bytes_per_s": self.current_rate(),
            "configured_bytes_per_s": self.default,
            "schedule_entries": len(self.schedule),
            "override_bytes_per_s": self.override,
            "bytes_total": self.bytes_total,
            "throttled_seconds": round(self.throttled_seconds + waiting, 3),
        }


# ----------------------------------------------------------------- cache backpressure

PRESSURE_START = 0.70  # cache fill where agents start being slowed (and warned about)
PRESSURE_MAX_DELAY = 0.1  # seconds per batch just below the quota


def cache_pressure_delay(used: int, quota: int) -> float:
    """How long the process server should wait before reading the next batch of a disk whose
    cache holds ``used`` of ``quota`` bytes: nothing below 70%, then rising linearly to 100 ms
    per batch at the quota (where reading stops until the applier frees space). A pause, never
    a refusal: the agent is slowed, its connection stays up."""
    if quota <= 0:
        return 0.0
    fill = used / quota
    if fill <= PRESSURE_START:
        return 0.0
    return PRESSURE_MAX_DELAY * min(1.0, (fill - PRESSURE_START) / (1.0 - PRESSURE_START))


_LIMITERS: dict[tuple[str, str], BandwidthLimiter] = {}


def limiter_for(cfg: Any) -> BandwidthLimiter:
    """The one limiter of the agent ``cfg`` describes (keyed by config file and agent name), made
    from ``cfg.bandwidth_limit`` / ``cfg.bandwidth_schedule`` on first use. A reload reconfigures
    it with :meth:`BandwidthLimiter.configure`."""
    key = (str(cfg.path), str(cfg.name))
    limiter = _LIMITERS.get(key)
    if limiter is None:
        limiter = BandwidthLimiter(
            getattr(cfg, "bandwidth_limit", 0), getattr(cfg, "bandwidth_schedule", ())
        )
        _LIMITERS[key] = limiter
    return limiter


__all__ = [
    "BandwidthLimiter",
    "ScheduleEntry",
    "TokenBucket",
    "cache_pressure_delay",
    "limit_at",
    "limiter_for",
    "parse_rate",
    "parse_schedule",
]
