"""The recovery-point catalog: every point's disk, seq, time, kind, tag and group, in sqlite3.

WAL mode, one connection used from the event loop thread (each call is a few small
statements). Rules it keeps: a point id is unique per disk (a marker sent twice is recorded
once); a group point is listed for the group only when every member disk has it.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    id TEXT NOT NULL,
    disk TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time_ns INTEGER NOT NULL,
    kind TEXT NOT NULL,
    tag TEXT NOT NULL DEFAULT '',
    grp TEXT NOT NULL DEFAULT '',
    hold_ms REAL NOT NULL DEFAULT 0,
    recorded_ns INTEGER NOT NULL,
    PRIMARY KEY (disk, id)
);
CREATE INDEX IF NOT EXISTS points_by_disk_time ON points (disk, time_ns);
CREATE INDEX IF NOT EXISTS points_by_group ON points (grp, id);
"""


@dataclass(frozen=True, slots=True)
class Point:
    id: str
    disk: str
    seq: int
    time_ns: int
    kind: str
    tag: str = ""
    group: str = ""
    hold_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "disk": self.disk,
            "seq": self.seq,
            "time_ns": self.time_ns,
            "kind": self.kind,
            "tag": self.tag,
            "group": self.group,
            "hold_ms": round(self.hold_ms, 3),
        }


_COLUMNS = "id, disk, seq, time_ns, kind, tag, grp, hold_ms"


class Catalog:
    """Recovery points of every disk of one process server."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a process crash loses nothing
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def add(self, point: Point, recorded_ns: int) -> bool:
        """Record ``point``; False when it was already there (same disk and id)."""
        cur = self._db.execute(
            f"INSERT OR IGNORE INTO points ({_COLUMNS}, recorded_ns) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                point.id,
                point.disk,
                point.seq,
                point.time_ns,
                point.kind,
                point.tag,
                point.group,
                point.hold_ms,
                recorded_ns,
            ),
        )
        return cur.rowcount == 1

    def points(self, disk: str) -> list[Point]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM points WHERE disk=? ORDER BY seq, time_ns", (disk,)
        ).fetchall()
        return [Point(*row) for row in rows]

    def get(self, disk: str, point_id: str) -> Point | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM points WHERE disk=? AND id=?", (disk, point_id)
        ).fetchone()
        return Point(*row) if row else None

    def newest(self, disk: str, kind: str | None = None, at_or_before_ns: int | None = None):
        sql = f"SELECT {_COLUMNS} FROM points WHERE disk=?"
        args: list[Any] = [disk]
        if kind is not None:
            sql += " AND kind=?"
            args.append(kind)
        if at_or_before_ns is not None:
            sql += " AND time_ns<=?"
            args.append(at_or_before_ns)
        row = self._db.execute(sql + " ORDER BY seq DESC LIMIT 1", args).fetchone()
        return Point(*row) if row else None

    def first_seq(self, disk: str, since_ns: int, min_seq: int = 0) -> int | None:
        """The lowest seq of a point of ``disk`` taken at or after ``since_ns`` (and at or
        after ``min_seq``); None when there is none."""
        row = self._db.execute(
            "SELECT MIN(seq) FROM points WHERE disk=? AND time_ns>=? AND seq>=?",
            (disk, since_ns, min_seq),
        ).fetchone()
        return None if row[0] is None else int(row[0])

    def summary(self, disk: str, min_seq: int) -> tuple[int, int | None]:
        """How many points of ``disk`` have a seq of at least ``min_seq``, and the time of the
        oldest of them."""
        count, oldest = self._db.execute(
            "SELECT COUNT(*), MIN(time_ns) FROM points WHERE disk=? AND seq>=?", (disk, min_seq)
        ).fetchone()
        return int(count), oldest

    def group_points(self, group: str, members: list[str]) -> list[list[Point]]:
        """Points of ``group`` that every member has, oldest first (one list per point id,
        in ``members`` order)."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM points WHERE grp=? ORDER BY time_ns", (group,)
        ).fetchall()
        by_id: dict[str, dict[str, Point]] = {}
        for row in rows:
            point = Point(*row)
            by_id.setdefault(point.id, {})[point.disk] = point
        out = []
        for members_of in by_id.values():
            if all(m in members_of for m in members):
                out.append([members_of[m] for m in members])
        return out

    def delete_before(self, disk: str, seq: int) -> int:
        """Forget points of ``disk`` below ``seq`` (their history is gone)."""
        return self._db.execute("DELETE FROM points WHERE disk=? AND seq<?", (disk, seq)).rowcount

    def delete(self, disk: str, ids: list[str]) -> int:
        n = 0
        for point_id in ids:
            n += self._db.execute(
                "DELETE FROM points WHERE disk=? AND id=?", (disk, point_id)
            ).rowcount
        return n

    def delete_disk(self, disk: str, keep: str | None = None) -> int:
        return self._db.execute(
            "DELETE FROM points WHERE disk=? AND id IS NOT ?", (disk, keep)
        ).rowcount

    def thin(self, disk: str, keep_all_after_ns: int, bucket_ns: int = 3600 * 10**9) -> int:
        """Older than ``keep_all_after_ns``: keep one crash-consistent point per ``bucket_ns``
        (the newest of each bucket) and every app-consistent and manual point. Group points
        are thinned per group by the same rule, so every member keeps the same ones."""
        rows = self._db.execute(
            "SELECT id, time_ns, grp FROM points WHERE disk=? AND time_ns<? "
            "AND kind='crash-consistent' ORDER BY time_ns DESC, id DESC",
            (disk, keep_all_after_ns),
        ).fetchall()
        seen: set[tuple[str, int]] = set()
        drop: list[str] = []
        for point_id, time_ns, group in rows:
            bucket = (group, time_ns // bucket_ns)
            if bucket in seen:
                drop.append(point_id)
            else:
                seen.add(bucket)
        return self.delete(disk, drop)


__all__ = ["Catalog", "Point"]
