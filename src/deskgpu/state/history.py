"""The observation history: compact samples in SQLite, bounded by a retention period.

`deskgpu observe` (a timer every few minutes) appends one observation: per session, one
row per GPU `(ts, gpu, util %, VRAM MiB)` and one activity row `(ts, SSH connections,
CPU %)`. A week of 5-minute observations of 8 busy GPUs is ~16,000 GPU rows (< 1 MiB).
The same store keeps the notices given to owners (the grace period's clock), which
`deskgpu queue` can show. `:memory:` gives a throwaway store for live sampling.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

from deskgpu.errors import OutsideError
from deskgpu.reap.evidence import ActivitySample, GpuSample

# A sample's fields as its record holds them (floats; None: unknown), in its order.
_GPU_COLUMNS = "CAST(ts AS REAL), gpu, CAST(util AS REAL), CAST(vram AS REAL)"
_ACTIVITY_COLUMNS = "CAST(ts AS REAL), ssh, cpu"
_new_gpu_sample = cast("Callable[[Any], GpuSample]", partial(tuple.__new__, GpuSample))
_new_activity_sample = cast(
    "Callable[[Any], ActivitySample]", partial(tuple.__new__, ActivitySample)
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS observations (ts INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS gpu_samples (
    cluster TEXT NOT NULL, ts INTEGER NOT NULL, gpu INTEGER NOT NULL,
    util INTEGER, vram INTEGER
);
CREATE INDEX IF NOT EXISTS gpu_samples_cluster_ts ON gpu_samples (cluster, ts);
CREATE TABLE IF NOT EXISTS activity_samples (
    cluster TEXT NOT NULL, ts INTEGER NOT NULL,
    ssh INTEGER, cpu REAL, cpu_total_s REAL
);
CREATE INDEX IF NOT EXISTS activity_samples_cluster_ts ON activity_samples (cluster, ts);
CREATE TABLE IF NOT EXISTS notices (
    cluster TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL,
    warned_at REAL NOT NULL, reap_after REAL NOT NULL, message TEXT NOT NULL
);
"""
FORMAT = "1"
# One transaction, its write lock taken up front (see open_history).
_CREATE = "\n".join(
    ["BEGIN IMMEDIATE;", _SCHEMA, "INSERT OR IGNORE INTO meta VALUES ('format', '1');", "COMMIT;"]
)
# Tables a deskgpu history holds: the schema above and the usage store's (state/usage.py).
OWN_TABLES = frozenset(
    {"meta", "observations", "gpu_samples", "activity_samples", "notices",
     "usage_sessions", "usage_box", "usage_waits"}
)  # fmt: skip


class HistoryDenied(OutsideError):
    """The history exists but this user may not read it."""


@dataclass(frozen=True)
class SessionSample:
    """What one observation saw of one session."""

    cluster: str
    gpus: tuple[tuple[int, float | None, float | None], ...]  # (gpu, util %, VRAM MiB)
    ssh_sessions: int | None
    cpu_total_s: float | None  # the pod's cumulative CPU seconds (cgroup), for CPU %


@dataclass(frozen=True)
class Notice:
    """A warning given to a session's owner: the grace period runs from `warned_at`."""

    cluster: str
    owner: str
    created_at: float | None
    warned_at: float
    reap_after: float
    message: str


class History:
    """One open history database. Use `open_history()`."""

    def __init__(self, db: sqlite3.Connection, path: str) -> None:
        self.db = db
        self.path = path

    # -- observations -------------------------------------------------------------------

    def append(self, ts: float, samples: Iterable[SessionSample]) -> None:
        """Record one observation (CPU % is computed against the previous one)."""
        t = int(ts)
        with self.db:
            self.db.execute("INSERT OR IGNORE INTO observations (ts) VALUES (?)", (t,))
            for s in samples:
                self.db.executemany(
                    "INSERT INTO gpu_samples VALUES (?, ?, ?, ?, ?)",
                    [(s.cluster, t, g, _int(u), _int(v)) for g, u, v in s.gpus],
                )
                cpu = self._cpu_pct(s.cluster, t, s.cpu_total_s)
                self.db.execute(
                    "INSERT INTO activity_samples VALUES (?, ?, ?, ?, ?)",
                    (s.cluster, t, s.ssh_sessions, cpu, s.cpu_total_s),
                )

    def _cpu_pct(self, cluster: str, ts: int, total: float | None) -> float | None:
        if total is None:
            return None
        row = self.db.execute(
            "SELECT ts, cpu_total_s FROM activity_samples WHERE cluster = ? AND ts < ? "
            "AND cpu_total_s IS NOT NULL ORDER BY ts DESC LIMIT 1",
            (cluster, ts),
        ).fetchone()
        if row is None or ts <= row[0] or total < row[1]:  # first look, or a restarted pod
            return None
        return round(100.0 * (total - float(row[1])) / (ts - int(row[0])), 1)

    def prune(self, before: float) -> None:
        """Drop what is older than `before`; give the space back when most of the file is
        free (a retention cut from a month to a week), not on every observation."""
        t = int(before)
        with self.db:
            for table in ("observations", "gpu_samples", "activity_samples"):
                self.db.execute(f"DELETE FROM {table} WHERE ts < ?", (t,))  # noqa: S608 - fixed names
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        if free > 128 and free * 2 > pages:  # over 512 KiB, and most of the file
            self.db.execute("VACUUM")

    def since(self) -> float | None:
        """The oldest observation kept."""
        row = self.db.execute("SELECT MIN(ts) FROM observations").fetchone()
        return None if row[0] is None else float(row[0])

    def latest(self) -> float | None:
        row = self.db.execute("SELECT MAX(ts) FROM observations").fetchone()
        return None if row[0] is None else float(row[0])

    def samples(
        self, clusters: Iterable[str], since: float, until: float | None = None
    ) -> dict[str, tuple[list[GpuSample], list[ActivitySample]]]:
        """Each cluster's samples from `since` on (before `until`, if given), oldest first."""
        out: dict[str, tuple[list[GpuSample], list[ActivitySample]]] = {}
        bounds = "ts >= ?" if until is None else "ts >= ? AND ts < ?"
        after = (int(since),) if until is None else (int(since), until)
        for cluster in dict.fromkeys(clusters):
            # One cluster at a time along the (cluster, ts) index: no sort of the whole table,
            # and no rows of sessions nobody asked about. SQLite casts the numbers the records
            # hold as floats, so each row becomes a sample without a Python call.
            gpu_rows = self.db.execute(
                f"SELECT {_GPU_COLUMNS} FROM gpu_samples WHERE cluster = ? AND {bounds} "  # noqa: S608 - fixed text
                "ORDER BY ts",
                (cluster, *after),
            ).fetchall()
            act_rows = self.db.execute(
                f"SELECT {_ACTIVITY_COLUMNS} FROM activity_samples WHERE cluster = ? AND {bounds} "  # noqa: S608 - fixed text
                "ORDER BY ts",
                (cluster, *after),
            ).fetchall()
            if not gpu_rows and not act_rows:
                continue
            out[cluster] = (
                list(map(_new_gpu_sample, gpu_rows)),
                list(map(_new_activity_sample, act_rows)),
            )
        return out

    # -- notices ------------------------------------------------------------------------

    def notice(self, cluster: str, created_at: float | None) -> Notice | None:
        """The notice of this incarnation of `cluster` (a same-named new one has none)."""
        row = self.db.execute(
            "SELECT cluster, owner, created_at, warned_at, reap_after, message FROM notices "
            "WHERE cluster = ?",
            (cluster,),
        ).fetchone()
        if row is None:
            return None
        found = Notice(*row)
        reborn = (
            created_at is not None
            and found.created_at is not None
            and abs(found.created_at - created_at) > 1
        )
        return None if reborn else found

    def record_notice(self, notice: Notice) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO notices VALUES (?, ?, ?, ?, ?, ?)",
                (
                    notice.cluster,
                    notice.owner,
                    notice.created_at,
                    notice.warned_at,
                    notice.reap_after,
                    notice.message,
                ),
            )

    def clear_notice(self, cluster: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM notices WHERE cluster = ?", (cluster,))

    def notices(self) -> list[Notice]:
        """Every pending notice (for `deskgpu queue`)."""
        rows = self.db.execute(
            "SELECT cluster, owner, created_at, warned_at, reap_after, message FROM notices "
            "ORDER BY reap_after"
        ).fetchall()
        return [Notice(*row) for row in rows]


def check_regular(p: Path) -> None:
    """The history is a regular file: a FIFO would hang every reader, a device never end.
    Raises `OSError` (FileNotFoundError, PermissionError) as `stat` does."""
    st = p.stat()
    if not stat.S_ISREG(st.st_mode):
        raise OutsideError(
            f"{p}: not a regular file; the observation history is a SQLite file of deskgpu's "
            "(move it away; `deskgpu observe` makes a new one)"
        )


def _foreign(db: sqlite3.Connection) -> str | None:
    """Why an existing database is not a deskgpu history (None: it is one, or empty)."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return None
    if (
        "meta" in tables
        and db.execute("SELECT 1 FROM meta WHERE key = 'format'").fetchone() is not None
    ):
        return None
    if tables <= OWN_TABLES:  # ours, its format row not written (a kill, an older deskgpu)
        return None
    return f"a SQLite database of something else (tables: {', '.join(sorted(tables)[:5])})"


@contextmanager
def open_history(path: Path | str, *, create: bool = True) -> Iterator[History]:
    """Open (and create, with its directory) the history; a failure is an `OutsideError`."""
    where = str(path)
    try:
        if where != ":memory:":
            p = Path(where)
            if not create and not p.exists():
                raise OutsideError(f"no observation history at {p}: is `deskgpu observe` running?")
            if create:
                p.parent.mkdir(parents=True, exist_ok=True)
            if p.exists() or p.is_symlink():
                check_regular(p)
        # IMMEDIATE: a write transaction takes its lock when it begins, so two writers wait
        # for each other (busy timeout) instead of one failing at once on a read-to-write
        # upgrade ("database is locked", seen with observe and reap --yes together).
        db = sqlite3.connect(where, timeout=30.0, isolation_level="IMMEDIATE")
    except (OSError, sqlite3.Error) as exc:
        raise OutsideError(f"cannot open the observation history {where}: {exc}") from None
    try:
        try:
            foreign = _foreign(db)
            if foreign:  # never create deskgpu's tables in someone else's database
                raise OutsideError(f"{where}: {foreign}, not deskgpu's observation history")
            if create:
                # One transaction: a kill between the tables and the format row would leave a
                # file the next run takes for someone else's database.
                db.executescript(_CREATE)
        except sqlite3.Error as exc:
            raise OutsideError(f"observation history {where}: {exc}") from None
        yield History(db, where)
    except sqlite3.Error as exc:
        raise OutsideError(f"observation history {where}: {exc}") from None
    finally:
        db.close()


@contextmanager
def history_copy(path: Path | str) -> Iterator[History]:
    """A private in-memory copy of the history, read without writing to the file.

    A dry run adds this moment's readings to the copy, so it decides exactly what a `--yes`
    run would, and leaves the shared history as it was.
    """
    p = Path(path)
    copy = sqlite3.connect(":memory:")
    try:
        with read_only(p, timeout_s=30.0) as source:
            source.backup(copy)
        yield History(copy, str(p))
    except sqlite3.Error as exc:
        raise OutsideError(f"observation history {p}: {exc}") from None
    finally:
        copy.close()


@contextmanager
def read_only(p: Path, timeout_s: float) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the history that never writes to it, and never fails on a
    hot journal: after a writer was killed mid-transaction, a `mode=ro` connection cannot
    roll the journal back ("attempt to write a readonly database"), so the history and its
    journal are copied to a private directory, where SQLite rolls the copy back. Waits for a
    lock at most `timeout_s`. Failures are `OutsideError`s."""
    try:
        check_regular(p)
        db = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout_s)
    except (OSError, sqlite3.Error) as exc:
        if isinstance(exc, OutsideError):
            raise
        raise OutsideError(f"cannot read the observation history {p}: {exc}") from None
    scratch: str | None = None
    try:
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as exc:
            if "readonly" not in str(exc) and "read-only" not in str(exc):
                raise
            db.close()
            scratch, db = _rolled_back_copy(p, timeout_s)
        yield db
    except sqlite3.Error as exc:
        raise OutsideError(f"cannot read the observation history {p}: {exc}") from None
    finally:
        db.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _rolled_back_copy(p: Path, timeout_s: float) -> tuple[str, sqlite3.Connection]:
    scratch = tempfile.mkdtemp(prefix="deskgpu-history-")
    try:
        copy = Path(scratch) / p.name
        shutil.copyfile(p, copy)
        journal = p.with_name(p.name + "-journal")
        if journal.exists():
            shutil.copyfile(journal, copy.with_name(copy.name + "-journal"))
        db = sqlite3.connect(copy, timeout=timeout_s)
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # rolls the copy back
    except (OSError, sqlite3.Error) as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise OutsideError(f"cannot read the observation history {p}: {exc}") from None
    return scratch, db


def read_notices(path: Path | str, timeout_s: float = 5.0) -> list[Notice]:
    """The pending notices, for `deskgpu queue`: read-only, never creating or waiting long.

    No history (observe never ran) is no notices; one this user may not read (the state
    directory is root's) is `HistoryDenied`; any other failure is an `OutsideError`.
    """
    p = Path(path)
    try:
        p.stat()
    except FileNotFoundError:
        return []
    except PermissionError:
        raise HistoryDenied(f"the observation history {p} is not readable by this user") from None
    except OSError as exc:
        raise OutsideError(f"cannot read the observation history {p}: {exc}") from None
    if not os.access(p, os.R_OK):
        raise HistoryDenied(f"the observation history {p} is not readable by this user")
    # `mode=ro`: a file gone meanwhile is not re-created
    with read_only(p, timeout_s) as db:
        found = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'notices'"
        ).fetchone()
        if found is None:
            return []
        return History(db, str(p)).notices()


def latest_observation(path: Path | str, timeout_s: float = 5.0) -> float | None:
    """The newest observation's time, read-only (for `deskgpu doctor`); None: none yet.

    Raises `HistoryDenied` when this user may not read it, `FileNotFoundError` when there is
    no history, and `OutsideError` for a file that is not a readable history.
    """
    p = Path(path)
    p.stat()  # FileNotFoundError / PermissionError say it plainly
    if not os.access(p, os.R_OK):
        raise HistoryDenied(f"permission denied: {p}")
    with read_only(p, timeout_s) as db:
        if db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is None:
            return None  # no table yet: a first observe killed before its tables committed
        try:
            return History(db, str(p)).latest()
        except sqlite3.Error as exc:
            raise OutsideError(f"not a deskgpu history: {exc}") from None


def _int(value: float | None) -> int | None:
    return None if value is None else round(value)
