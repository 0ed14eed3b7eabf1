"""Sessions a trusted front end (Transformer Lab) launched for a researcher, and the ones it
has likely given up on.

The admin policy labels such a cluster with the front end's account (`deskgpu.io/via`) and
its own job id (`deskgpu.io/frontend-job`). Transformer Lab polls a cluster's job queue and,
after `EMPTY_PROVIDER_JOBS_TERMINAL_THRESHOLD` polls that find nothing, `REMOTE_JOB_STATUS_
INTERVAL_SECONDS` apart (15 x 15 s by default), marks its job FAILED, while the SkyPilot
cluster keeps waiting for GPUs and starts later with nobody watching (docs/transformerlab.md).
A Queued session of a front end that has waited longer than the host config's
`frontend_gives_up_after` is such a likely orphan: shown, never torn down for it.

Pure over the queue's records: no SkyPilot, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from deskgpu.labels import LABEL_FRONTEND_JOB, LABEL_VIA

# Front ends by the account they run as, as people know them.
KNOWN = {"transformerlab": "Transformer Lab"}
QUEUED = "Queued"  # deskgpu's state (snapshot.QUEUED), kept here to stay import-free


@dataclass(frozen=True)
class Via:
    """Which front end launched a session, and its own job id there (None: not given)."""

    account: str
    job: str | None

    @property
    def name(self) -> str:
        return KNOWN.get(self.account, self.account)

    def __str__(self) -> str:
        return f"via {self.name}" + (f" job {self.job}" if self.job else "")


def via(labels: Mapping[str, str]) -> Via | None:
    account = labels.get(LABEL_VIA)
    return Via(account, labels.get(LABEL_FRONTEND_JOB) or None) if account else None


@dataclass(frozen=True)
class Orphan:
    cluster: str
    user: str | None
    via: Via
    waited_s: float

    def note(self, gives_up_after_s: float) -> str:
        from deskgpu.units import format_duration

        return (
            f"likely orphan: session {self.cluster} ({self.user or '?'}, {self.via}) has "
            f"waited {format_duration(self.waited_s)} for GPUs, longer than "
            f"{self.via.name} waits ({format_duration(gives_up_after_s)}, "
            "frontend_gives_up_after): it will start with nobody watching; its owner or an "
            f"admin ends it with `deskgpu cancel {self.cluster}`"
        )


def likely_orphans(clusters: Iterable[object], now: float, gives_up_after_s: float) -> list[Orphan]:
    """Front-end sessions still Queued after the front end has likely stopped watching.

    `clusters`: the queue's `Cluster` records (name, user, state, launched_at, labels)."""
    found = []
    for c in clusters:
        labels = getattr(c, "labels", None) or {}
        launched = getattr(c, "launched_at", None)
        where = via(labels)
        if where is None or getattr(c, "state", None) != QUEUED or launched is None:
            continue
        waited = now - float(launched)
        if waited > gives_up_after_s:
            found.append(
                Orphan(str(getattr(c, "name", "?")), getattr(c, "user", None), where, waited)
            )
    return found
