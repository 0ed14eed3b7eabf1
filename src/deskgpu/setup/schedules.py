"""The box's two schedules, in one place: what runs, when, and under which unit.

`deskgpu setup render` writes the timers, services and cron lines from these; `deskgpu doctor`
suggests exactly these lines as fixes and counts an installed schedule only when its command
parses, against the real CLI, to the same command as these (`deskgpu.doctor.scheduled`).
Imports nothing heavy: doctor and setup both read it.
"""

from __future__ import annotations

from dataclasses import dataclass

OBSERVE_EVERY_MIN = 5


@dataclass(frozen=True)
class Schedule:
    """One scheduled deskgpu command."""

    key: str  # "observe" / "reap": the doctor check is `operations.<key>_scheduled`
    args: tuple[str, ...]  # the deskgpu arguments, e.g. ("observe", "--quiet")
    unit: str  # the systemd service/timer stem
    what: str  # "the periodic observation"
    when: str  # "every 5 minutes", for people
    cron: str  # the cron time fields
    timer: tuple[str, ...]  # the [Timer] lines

    @property
    def service(self) -> str:
        return f"{self.unit}.service"

    @property
    def timer_unit(self) -> str:
        return f"{self.unit}.timer"

    @property
    def check_id(self) -> str:
        return f"operations.{self.key}_scheduled"

    def command(self, deskgpu: str = "deskgpu") -> str:
        return " ".join((deskgpu, *self.args))

    def cron_line(self, deskgpu: str = "deskgpu") -> str:
        """Its line in /etc/cron.d/deskgpu (system crontab format: with the user)."""
        return f"{self.cron}  root  {self.command(deskgpu)}"


OBSERVE = Schedule(
    key="observe",
    args=("observe", "--quiet"),
    unit="deskgpu-observe",
    what="the periodic observation",
    when=f"every {OBSERVE_EVERY_MIN} minutes",
    cron=f"*/{OBSERVE_EVERY_MIN} * * * *",
    timer=("OnBootSec=2min", f"OnUnitActiveSec={OBSERVE_EVERY_MIN}min", "AccuracySec=30s"),
)
REAP = Schedule(
    key="reap",
    args=("reap", "--yes", "--quiet"),
    unit="deskgpu-reap",
    what="the weekly reap",
    when="every Sunday at 03:00",
    cron="0 3 * * 0",
    timer=("OnCalendar=Sun *-*-* 03:00:00", "Persistent=true", "RandomizedDelaySec=5min"),
)
SCHEDULES = (OBSERVE, REAP)
CRON_FILE = "/etc/cron.d/deskgpu"
# Parameters an installed schedule may set differently and still do the same job: they change
# only what it prints (`reap` without `--yes` is a dry run, with `--evidence` a replay; a
# `--config` or `--record` path that is wrong stops the run: none of those counts).
# `observe --textfile` only writes metrics beside the observation.
COSMETIC_PARAMS = frozenset({"quiet", "json_out", "kill_unmanaged", "textfile"})
