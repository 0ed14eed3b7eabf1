"""Which job or session a researcher means: `logs`, `cancel` and `ssh` share this.

A NAME is what the spec says (`bert-finetune`), the full SkyPilot name
(`alice-bert-finetune`), a managed job id (`7`), or the spec file itself. It is looked up
in one read of the queue (`skyapi.fetch_queue`: plain HTTP, the probe first, no `import
sky`): batch specs are managed jobs, interactive ones clusters. Pure apart from that read;
no typer, no SkyPilot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deskgpu.errors import OutsideError, UsageError
from deskgpu.identity import cluster_name, is_dns_label, safe_user

if TYPE_CHECKING:
    from deskgpu.config import HostConfig
    from deskgpu.deadline import Deadline
    from deskgpu.identity import Actor
    from deskgpu.snapshot import SkyView

MANAGED_JOB = "managed job"
SESSION = "session"
_FINISHED = {"Done", "Failed", "Cancelled"}  # snapshot.DONE, FAILED, CANCELLED
_MAX_JOB_ID = 2**31 - 1
_MAX_SHOWN = 8  # candidates named in one line


@dataclass(frozen=True)
class Query:
    """What the researcher typed, parsed: a job id, or names to match, maybe of one kind."""

    raw: str
    job_id: int | None = None
    names: tuple[str, ...] = ()
    kind: str | None = None  # MANAGED_JOB or SESSION when a spec file said which


@dataclass(frozen=True)
class Target:
    """One managed job or session, as the queue showed it."""

    kind: str
    name: str
    owner: str | None
    state: str
    job_id: int | None = None

    @property
    def finished(self) -> bool:
        return self.state in _FINISHED

    def describe(self) -> str:
        """`managed job 7 alice-bert-finetune (running)`, `session alice-dev (queued)`."""
        ident = f"{MANAGED_JOB} {self.job_id}" if self.kind == MANAGED_JOB else SESSION
        return f"{ident} {self.name} ({self.state.lower()})"


def parse_name(raw: str, user: str) -> Query:
    """Validate NAME before anything reaches SkyPilot; raises `UsageError`."""
    text = raw.strip()
    shown = _shown(raw)
    if len(text) > _MAX_NAME:
        raise UsageError(f"{shown}: {len(text)} characters, too long for a job name or a path")
    if text.isdigit() and text.isascii():
        # Compared as text first: int() of thousands of digits is refused by Python itself.
        if len(text.lstrip("0")) > len(str(_MAX_JOB_ID)) or not 0 < int(text) <= _MAX_JOB_ID:
            raise UsageError(f"{shown}: not a managed job id")
        return Query(raw, job_id=int(text))
    path = Path(text)
    if text.endswith((".yaml", ".yml")) or "/" in text or _exists(path):
        return _spec_query(raw, path, user)
    if not is_dns_label(text):
        raise UsageError(
            f"{_shown(raw)!r}: not a job name (lowercase letters, digits and '-', as in the spec's "
            "`name:`), a managed job id or a spec file"
        )
    return Query(raw, names=_names(text, user))


def _names(name: str, user: str) -> tuple[str, ...]:
    full = cluster_name(user, name)
    return (full, name) if full != name else (name,)


def _spec_query(raw: str, path: Path, user: str) -> Query:
    """The spec's `name` and kind, read without the rest of its validation (a spec that
    no longer submits still names its job)."""
    import yaml

    from deskgpu.recorded import read_bounded
    from deskgpu.yamlio import MAX_BYTES

    try:
        # A regular file of a spec's size only: never a FIFO, /dev/zero or a 50 MB file.
        text = read_bounded(path, "a spec", MAX_BYTES).decode("utf-8")
    except UsageError as exc:
        reason = str(exc).split(": ", 1)[-1]
        raise UsageError(f"{_shown(raw)}: cannot read the spec file ({reason})") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{_shown(raw)}: cannot read the spec file ({_reason(exc)})") from None
    try:
        doc: Any = yaml.safe_load(text)
    except yaml.YAMLError:
        hint = f"`deskgpu submit --dry-run {raw}` says where"
        raise UsageError(f"{raw}: not valid YAML ({hint})") from None
    name = doc.get("name") if isinstance(doc, dict) else None
    if not isinstance(name, str) or not is_dns_label(name):
        raise UsageError(f"{raw}: the spec has no valid `name:` to look up")
    kind = SESSION if doc.get("interactive") is True else MANAGED_JOB
    return Query(raw, names=(cluster_name(user, name),), kind=kind)


_MAX_NAME = 4096  # PATH_MAX: longer is neither a name nor a path


def _shown(raw: str) -> str:
    """NAME as an error line quotes it: cut to a readable length."""
    return raw if len(raw) <= 80 else f"{raw[:60]}... ({len(raw)} characters)"


def _exists(path: Path) -> bool:
    """Whether `path` names something (a name too long for the file system names nothing)."""
    try:
        return path.exists() or path.is_symlink()
    except (OSError, ValueError):
        return False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


def targets(view: SkyView) -> list[Target]:
    """Every managed job and session in the queue, as `Target`s."""
    found = [
        Target(MANAGED_JOB, job.name or f"job-{job.id}", job.user, job.state, job.id)
        for job in view.jobs
    ]
    found += [Target(SESSION, c.name, c.user, c.state) for c in view.clusters]
    return found


def owned_by(target: Target, user: str) -> bool:
    return target.owner is not None and target.owner in (user, safe_user(user))


def resolve(query: Query, user: str, view: SkyView, *, sessions_only: bool = False) -> Target:
    """The one job or session `query` means, preferring the caller's own; `UsageError`
    when it means none (listing the caller's as candidates) or several."""
    everything = targets(view)
    if query.job_id is not None:
        hits = [t for t in everything if t.kind == MANAGED_JOB and t.job_id == query.job_id]
    else:
        hits = [t for t in everything if t.name in query.names]
    if query.kind is not None:
        hits = [t for t in hits if t.kind == query.kind]
    if sessions_only and any(t.kind == SESSION for t in hits):
        hits = [t for t in hits if t.kind == SESSION]
    if not hits:
        raise UsageError(_not_found(query, user, everything))
    # The caller's own come first: `dev` is theirs even if someone's job is called `dev`.
    own = [t for t in hits if owned_by(t, user)]
    hits = own or hits
    jobs = [t for t in hits if t.kind == MANAGED_JOB]
    sessions = [t for t in hits if t.kind == SESSION]
    if jobs and sessions:
        raise UsageError(
            f"{query.raw}: both {sessions[0].describe()} and {_newest(jobs).describe()}: give "
            f"the job id ({_newest(jobs).job_id}) or the spec file"
        )
    if sessions:
        return sessions[0]  # cluster names are unique on the server
    live = [t for t in jobs if not t.finished]
    if len(live) > 1:
        ids = ", ".join(str(t.job_id) for t in sorted(live, key=_job_id))
        raise UsageError(f"{query.raw}: {len(live)} managed jobs of that name ({ids}): give the id")
    return live[0] if live else _newest(jobs)


def _job_id(target: Target) -> int:
    return target.job_id or 0


def _newest(jobs: list[Target]) -> Target:
    return max(jobs, key=_job_id)


def _not_found(query: Query, user: str, everything: list[Target]) -> str:
    what = f"managed job {query.job_id}" if query.job_id is not None else "job or session"
    named = "" if query.job_id is not None else f" named {query.names[0]}"
    mine = [t for t in everything if owned_by(t, user)]
    shown = [t for t in mine if not t.finished] or sorted(mine, key=_job_id)[-_MAX_SHOWN:]
    if not shown:
        return f"{query.raw}: no {what}{named} is yours, and you have none (`deskgpu queue`)"
    listed = ", ".join(t.describe() for t in shown[:_MAX_SHOWN])
    more = f" and {len(shown) - _MAX_SHOWN} more" if len(shown) > _MAX_SHOWN else ""
    return f"{query.raw}: no {what}{named} is yours; yours: {listed}{more}"


def refusal(target: Target, actor: Actor, config: HostConfig, verb: str) -> str | None:
    """Why `actor` may not `verb` (`cancel`, `read the logs of`) this target; None: may.

    Others' jobs and sessions need root or the trusted `admin_group`: reap's rule
    (`identity.may_act_on`), which also refuses an owner name two accounts share.
    """
    from deskgpu.identity import may_act_on, passwd_names, trusted_admin_group

    why = may_act_on(actor, target.owner or "?", trusted_admin_group(config), passwd_names())
    return None if why is None else f"may not {verb} {target.describe()}: {why}"


def lookup(
    raw: str,
    config: HostConfig,
    actor: Actor,
    deadline: Deadline,
    *,
    verb: str,
    sessions_only: bool = False,
) -> Target:
    """Parse, read the queue once, resolve and check who may act; typed errors only."""
    from deskgpu.skypilot import sdk as skyapi

    query = parse_name(raw, actor.user)
    view = skyapi.fetch_queue(config, deadline=deadline)
    if not view.available:
        raise OutsideError(view.error or "SkyPilot's queue is unavailable")
    if view.notes:  # half the queue: a name missing from it may just be unseen
        raise OutsideError(f"cannot look {raw} up: {'; '.join(view.notes)}")
    target = resolve(query, actor.user, view, sessions_only=sessions_only)
    why = refusal(target, actor, config, verb)
    if why is not None:
        raise UsageError(why)
    return target


def others_note(target: Target, actor: Actor) -> str:
    """`` (bob's)`` when acting on someone else's target, so the line says so."""
    return "" if owned_by(target, actor.user) else f" ({target.owner or '?'}'s)"
