"""The run lock, the audit log (JSON lines) and the evidence files it points to.

Every decision and action of a reap run is one line in the audit log; the line carries
the decision's reasons and a summary of its evidence, and names the evidence file (the
whole document, gzipped) that `deskgpu reap --evidence FILE` re-decides from.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deskgpu.errors import OutsideError, UsageError
from deskgpu.reap.evidence import Evidence, EvidenceError, parse_ts
from deskgpu.recorded import read_document, write_document

EVIDENCE_KEEP = 200  # evidence files kept; older ones are deleted


class LockBusy(OutsideError):
    """Another run holds the reap lock (not a fault: try again later)."""


@contextlib.contextmanager
def run_lock(path: Path, timeout_s: float, poll_s: float = 0.2) -> Iterator[None]:
    """Serialize reap runs (and observe's warnings) on an flock; released on any exit."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutsideError(f"cannot open the reap lock {path}: {exc.strerror or exc}") from None
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise OutsideError(f"cannot lock {path}: {exc.strerror}") from None
                if time.monotonic() >= deadline:
                    raise LockBusy(
                        f"another reap holds {path} for over {timeout_s:g} s; try again later"
                    ) from None
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing releases the flock


class AuditLog:
    """Append-only JSON lines; each record is written with one `write` on an O_APPEND fd."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def check_writable(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            os.close(fd)
        except OSError as exc:
            raise OutsideError(
                f"cannot write the audit log {self.path} ({exc.strerror or exc}): reap acts only "
                "when it can record why; run as root or set reap.audit_log"
            ) from None

    def append(self, record: dict[str, Any]) -> None:
        """Write one record whole, or nothing: a short write (a full disk, `ulimit -f`) is
        cut back off and raised, and a torn last line left by a killed writer is closed off
        first, so the next record never fuses with a fragment. Callers hold the reap lock
        (one writer at a time)."""
        line = json.dumps(record, sort_keys=False, default=str, separators=(",", ":")) + "\n"
        data = line.encode()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise OutsideError(f"cannot append to the audit log {self.path}: {exc}") from None
        size = None
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # fence a torn tail off: it stays unreadable on its own
            written = 0
            while written < len(data):
                n = os.write(fd, data[written:])
                if n <= 0:
                    raise OSError(errno.EIO, "wrote nothing")
                written += n
        except OSError as exc:
            if size is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)  # no half record left behind
            reason = exc.strerror or str(exc)
            raise OutsideError(f"cannot append to the audit log {self.path}: {reason}") from None
        finally:
            os.close(fd)


RUN_EVENT = "run"  # the line every `reap --yes` run ends with, whatever it found
TAIL_BYTES = 1024 * 1024  # the last reap run is near the end: read no more than this


def tail_lines(path: Path, limit: int = TAIL_BYTES) -> list[bytes]:
    """The audit log's last `limit` bytes, as lines (the first may be torn). OSError as
    opening or reading raises it."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - limit))
        return f.read().splitlines()


def last_reap_run(path: Path) -> tuple[float, str] | None:
    """(time, run id) of the newest `reap --yes` run in the audit log; None: none recorded.

    Older deskgpu wrote no `run` line; a non-dry-run `decision` of a reap (not observe) run
    proves such a run too. Raises OSError when the log cannot be read.
    """
    for raw in reversed(tail_lines(path)):
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError):  # a torn first line of the tail, or garbage
            continue
        if not isinstance(record, dict):
            continue
        run_id = str(record.get("run_id", ""))
        is_reap = record.get("event") == RUN_EVENT or (
            record.get("event") == "decision"
            and record.get("dry_run") is False
            and not run_id.startswith("observe-")
        )
        if is_reap:
            try:
                when = parse_ts(record.get("ts"), "audit log")
            except EvidenceError:
                continue
            if when is not None:
                return when, run_id
    return None


INTENT = "warning"  # a notice about to be given: its line comes first, and is not a notice
TEARDOWN_INTENT = "tearing-down"  # a teardown about to run: its line comes first too
CLEARED = "notice-cleared"  # a notice that no longer counts: its line comes before it goes


def newest_actions(path: Path) -> dict[str, dict[str, Any]]:
    """The newest `action` record per session (subject) in the audit log's tail."""
    try:
        lines = tail_lines(path)
    except OSError:
        return {}
    newest: dict[str, dict[str, Any]] = {}
    for raw in lines:
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict) and record.get("event") == "action":
            newest[str(record.get("subject"))] = record
    return newest


def cut_short(newest: dict[str, dict[str, Any]], cluster: str, created_at: str | None) -> bool:
    """Whether the newest line on this session incarnation is a notice's intent that its
    run never completed (a kill, a crash, between the line and the notice)."""
    record = newest.get(cluster)
    return (
        record is not None
        and record.get("did") == INTENT
        and "session_created_at" in record
        and record.get("session_created_at") == created_at
    )


def save_evidence(directory: Path, run_id: str, evidence: Evidence) -> Path:
    """Write the run's whole evidence document (gzipped JSON); keep the newest files only."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where the folder goes, a read-only disk
        raise OutsideError(
            f"cannot keep the evidence in {directory} ({exc.strerror or exc}): reap acts only "
            "when it can record why"
        ) from None
    path = directory / f"{run_id}.json.gz"
    write_document(path, evidence.to_dict(), "the evidence", indent=None, failure=OutsideError)
    old = sorted(directory.glob("*.json.gz"))[:-EVIDENCE_KEEP]
    for stale in old:
        stale.unlink(missing_ok=True)
    return path


def write_evidence(path: Path, evidence: Evidence) -> None:
    """`--record FILE`: plain JSON, or gzipped when the name ends in `.gz`."""
    write_document(path, evidence.to_dict(), "the evidence", indent=1)


def read_evidence(path: Path) -> Evidence:
    """A recorded evidence document (plain or gzipped JSON); problems are usage errors."""
    try:
        return Evidence.from_dict(read_document(path, "the evidence"))
    except EvidenceError as exc:
        raise UsageError(f"{path}: {exc}") from None
