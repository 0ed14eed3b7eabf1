"""Operations: the observation and the weekly reap are scheduled, and really run.

A schedule counts only when its program is executable and its arguments parse, with deskgpu's
own CLI, to the command `deskgpu setup render` schedules (`deskgpu.setup.schedules`); its
timer must be active. Then the box's own records must prove it: the reap history's newest
observation is recent, and the audit log shows a `reap --yes` run this week.
"""

from __future__ import annotations

from dataclasses import dataclass

from deskgpu.config import HostConfig
from deskgpu.config.doctor import Settings
from deskgpu.config.reap import ReapSettings
from deskgpu.doctor.checks.base import (
    FAIL,
    INSTALL,
    OK,
    RENDER,
    RENDER_OUT,
    SKIP,
    WARN,
    Check,
    _Component,
)
from deskgpu.doctor.facts import HostFacts
from deskgpu.doctor.scheduled import (
    SYSTEMD_GUARD,
    Parsed,
    Scheduled,
    find_scheduled,
    parse_args,
    timer_of,
)
from deskgpu.errors import SpecError
from deskgpu.setup.schedules import COSMETIC_PARAMS, CRON_FILE, OBSERVE, REAP, Schedule
from deskgpu.units import format_duration

_ops = _Component("operations")
REAP_RAN_WITHIN_S = 8 * 86400  # a weekly timer, with a day's slack (Persistent=, a reboot)


def schedule_fix(schedule: Schedule) -> str:
    """Install exactly what `deskgpu setup render` writes for `schedule`."""
    return (
        f"install the rendered {schedule.timer_unit}: `{RENDER}`, then `{INSTALL}`; where "
        f"systemd does not run, install {RENDER_OUT}/cron/deskgpu as {CRON_FILE} instead (its "
        f"line: `{schedule.cron_line()}`), never both"
    )


def check_operations(facts: HostFacts, config: HostConfig, s: Settings) -> list[Check]:
    crontab = facts.command("crontab")
    found = find_scheduled(
        facts.files, crontab.stdout if crontab and crontab.ok else None, facts.user
    )
    gap = _max_sample_gap_s(config)
    return [
        _check_schedule(facts, OBSERVE, found, gap),
        _check_observe_fresh(facts, gap),
        _check_schedule(facts, REAP, found, REAP_RAN_WITHIN_S),
        _check_reap_ran(facts),
    ]


@dataclass(frozen=True)
class _Verdict:
    entry: Scheduled
    status: str  # OK, WARN (not confirmed) or FAIL (does not run)
    why: str
    fix: str | None = None  # a fix for this entry, better than installing the rendered files


def _shown(entry: Scheduled) -> str:
    return f"{entry.kind} {entry.where}: `{entry.line}`"


def _relevant(parsed: Parsed | str, wanted: Parsed) -> bool:
    """Meant as this schedule: the same command, or arguments that do not parse at all."""
    return isinstance(parsed, str) or parsed.command == wanted.command


def _same_job(parsed: Parsed, wanted: Parsed) -> list[str]:
    """The parameters in which `parsed` does a different job than the rendered command."""
    return sorted(
        k
        for k in set(parsed.params) | set(wanted.params)
        if k not in COSMETIC_PARAMS and parsed.params.get(k) != wanted.params.get(k)
    )


def _program(entry: Scheduled, facts: HostFacts) -> str | None:
    """Why the program does not run (None: it does)."""
    if not entry.candidates:
        return f"`{entry.program}` is not an absolute path or a name on its PATH"
    seen = [facts.executables[c] for c in entry.candidates if c in facts.executables]
    if not seen:
        return (
            f"{entry.candidates[0]} was not looked at (facts recorded by an older doctor: "
            "rerun `deskgpu doctor --record FILE`)"
        )
    for fact in seen:
        if fact.exists and fact.executable:
            return None
    first = seen[0]
    if len(entry.candidates) > 1:
        return f"no executable `{entry.program}` on its PATH ({', '.join(entry.candidates)})"
    if not first.exists:
        return f"{first.path} does not exist" + (f" ({first.error})" if first.error else "")
    return f"{first.path} is not executable"


def _systemd_running(facts: HostFacts) -> bool | None:
    timers = facts.command("systemctl_timers")
    if timers is None:
        return None
    if timers.ok:
        return True
    said = (timers.stderr + timers.stdout).lower()
    if timers.missing or "not been booted with systemd" in said or "host is down" in said:
        return False
    return None


def _timer_state(entry: Scheduled, facts: HostFacts) -> _Verdict | None:
    """For a service: why its timer does not (provably) fire; None when it does."""
    service = entry.where.rsplit("/", 1)[-1]
    timer = timer_of(service, facts.files)
    if timer is None:
        return _Verdict(entry, FAIL, f"no .timer starts {service}")
    name = timer[0]
    timers = facts.command("systemctl_timers")
    running = _systemd_running(facts)
    if timers is None:
        return _Verdict(entry, WARN, f"systemd was not asked whether {name} is active")
    if running is False:
        return _Verdict(entry, FAIL, f"systemd is not running here, so {name} never fires")
    if not timers.ok:
        why = timers.first_error_line()
        return _Verdict(entry, WARN, f"could not ask systemd whether {name} is active: {why}")
    for line in timers.stdout.splitlines():
        words = line.split()
        if name in words:
            # An inactive timer (listed with --all) has no next run: "-" or "n/a".
            if words[0] in ("-", "n/a"):
                break
            return None
    return _Verdict(
        entry,
        FAIL,
        f"{name} is not active (`systemctl list-timers` shows no next run)",
        f"`sudo systemctl enable --now {name}`",
    )


def _cron_state(entry: Scheduled, facts: HostFacts) -> _Verdict | None:
    """For a cron line: why cron does not (provably) run it; None when it does."""
    if entry.guard:
        if SYSTEMD_GUARD.match(entry.guard):
            running = _systemd_running(facts)
            if running:
                return _Verdict(
                    entry,
                    FAIL,
                    f"`{entry.guard} ||` skips it where systemd runs, as here (the timer is "
                    "meant to do it)",
                )
            if running is None:
                return _Verdict(entry, WARN, f"it runs only if `{entry.guard}` fails")
        else:
            return _Verdict(entry, WARN, f"it runs only if `{entry.guard}` fails")
    if facts.cron_running is False:
        return _Verdict(
            entry,
            FAIL,
            "no cron daemon runs on this host",
            "`sudo systemctl enable --now cron` (or use the rendered timers)",
        )
    if facts.cron_running is None:
        return _Verdict(entry, WARN, "doctor could not tell whether a cron daemon runs")
    return None


def _judge(
    entry: Scheduled, parsed: Parsed | str, wanted: Parsed, facts: HostFacts, most_s: float
) -> _Verdict:
    if entry.ignored:
        return _Verdict(entry, FAIL, entry.ignored)
    if any(a.endswith("\r") for a in entry.args):
        return _Verdict(
            entry,
            FAIL,
            "the line ends in a Windows line ending, which cron passes on (`--quiet\\r` is "
            "no option)",
            f"`sudo sed -i 's/\\r$//' {entry.where}`",
        )
    if isinstance(parsed, str):
        return _Verdict(entry, FAIL, f"deskgpu refuses its arguments: {parsed.rstrip('.')}")
    differs = _same_job(parsed, wanted)
    if differs:
        shown = ", ".join(f"{k}={parsed.params.get(k)!r}" for k in differs)
        return _Verdict(entry, FAIL, f"it runs a different job than the rendered one ({shown})")
    if entry.user is not None and entry.user != "root":
        return _Verdict(entry, FAIL, f"it runs as {entry.user}; deskgpu {parsed.command[0]} "
                        "needs root (every pod's processes, the state directory)")  # fmt: skip
    if entry.gap_s is not None and entry.gap_s > most_s:
        return _Verdict(
            entry,
            FAIL,
            f"it runs only every {format_duration(entry.gap_s)}; it must run at least every "
            f"{format_duration(most_s)}",
        )
    why = _program(entry, facts)
    if why:
        return _Verdict(entry, FAIL, why)
    state = _timer_state(entry, facts) if entry.kind == "systemd" else _cron_state(entry, facts)
    return state or _Verdict(entry, OK, "")


def _check_schedule(
    facts: HostFacts, schedule: Schedule, found: list[Scheduled], most_s: float
) -> Check:
    name = f"{schedule.key}_scheduled"
    wanted = parse_args(schedule.args)
    if isinstance(wanted, str):  # the generator and the CLI disagree: a deskgpu bug
        return _ops(name, FAIL, f"deskgpu's own schedule does not parse: {wanted}", None)
    verdicts = []
    for entry in found:
        parsed = parse_args(entry.args)
        if _relevant(parsed, wanted):
            verdicts.append(_judge(entry, parsed, wanted, facts, most_s))
    good = [v for v in verdicts if v.status == OK]
    fix = schedule_fix(schedule)
    if len(good) > 1:
        return _ops(
            name,
            WARN,
            f"{schedule.what} runs {len(good)} times over: "
            + "; ".join(_shown(v.entry) for v in good),
            f"keep one: the rendered {schedule.timer_unit} or the line in {CRON_FILE}",
        )
    if good:
        return _ops(name, OK, _shown(good[0].entry))
    unsure = [v for v in verdicts if v.status == WARN]
    if unsure:
        v = unsure[0]
        return _ops(name, WARN, f"{_shown(v.entry)}: {v.why}", v.fix or fix)
    if verdicts:
        v = verdicts[0]
        detail = f"{_shown(v.entry)} does not run {schedule.what}: {v.why}"
        return _ops(name, FAIL, detail, v.fix or fix)
    hidden = ""
    spool = facts.file("cron_spool")
    if spool is not None and spool.error:
        hidden = " (other users' crontabs not visible without root)"
    return _ops(
        name,
        FAIL,
        f"no cron line or systemd timer runs {schedule.what} (`{schedule.command()}`){hidden}",
        fix,
    )


def _unreadable(name: str, status: str, what: str, error: str, facts: HostFacts, fix: str) -> Check:
    """A record doctor could not read: for want of root it proves nothing either way."""
    if "permission" in error.lower():
        who = facts.user or "this user"
        return _ops(
            name, SKIP, f"cannot read {what} as {who} (rerun as root: `sudo deskgpu doctor`)"
        )
    return _ops(name, status, f"cannot read {what}: {error}", fix)


def _max_sample_gap_s(config: HostConfig) -> int:
    """reap's own freshness rule: older than this, it will not decide from the history."""
    try:
        return config.reap_settings.max_sample_gap_s
    except SpecError:  # reap refuses such a config itself (exit 2); judge by its default
        return ReapSettings.max_sample_gap_s


def _check_observe_fresh(facts: HostFacts, gap: int) -> Check:
    """`gap`: reap's own freshness rule (`reap.max_sample_gap`)."""
    name = "observe_fresh"
    records = facts.records
    fix = (
        f"see why it stopped: `systemctl status {OBSERVE.service}` and `journalctl -u "
        f"{OBSERVE.service} -n 50` (cron: `grep deskgpu /var/log/syslog`); observe once by hand: "
        "`sudo deskgpu observe`"
    )
    if records is None:
        return _ops(name, SKIP, "reap's records were not read (facts from an older doctor)")
    where = records.history_path
    if records.history_error:
        return _unreadable(name, FAIL, f"the history {where}", records.history_error, facts, fix)
    if not records.history_exists:
        return _ops(name, FAIL, f"no observation history at {where}: observe never ran", fix)
    if records.history_latest is None:
        return _ops(name, FAIL, f"the history {where} holds no observation yet", fix)
    age = facts.gathered_at - records.history_latest
    if age < -60:
        return _ops(
            name,
            WARN,
            f"the newest observation in {where} is {format_duration(-age)} in the future",
            "check the clock: `timedatectl` (NTP synchronized: yes)",
        )
    if age > gap:
        return _ops(
            name,
            FAIL,
            f"the newest observation in {where} is {format_duration(age)} old; reap decides "
            f"only from a history observed within {format_duration(gap)} (reap.max_sample_gap)",
            fix,
        )
    return _ops(name, OK, f"newest observation {format_duration(max(age, 0))} ago ({where})")


def _check_reap_ran(facts: HostFacts) -> Check:
    name = "reap_ran"
    records = facts.records
    fix = (
        f"see why it did not run: `systemctl status {REAP.timer_unit} {REAP.service}` and "
        f"`journalctl -u {REAP.service} -n 50`; run it by hand: `sudo deskgpu reap --yes`"
    )
    if records is None or records.audit_path is None:
        return _ops(name, SKIP, "reap's audit log was not read (facts from an older doctor)")
    where = records.audit_path
    if records.audit_error:
        return _unreadable(name, WARN, f"the audit log {where}", records.audit_error, facts, fix)
    if not records.audit_exists or records.audit_last_reap is None:
        return _ops(name, WARN, f"{where} records no `reap --yes` run yet", fix)
    age = facts.gathered_at - records.audit_last_reap
    run = f"run {records.audit_last_reap_id}" if records.audit_last_reap_id else "run"
    if age < -60:
        return _ops(
            name,
            WARN,
            f"the last `reap --yes` {run} in {where} is dated {format_duration(-age)} in the "
            "future",
            "check the clock: `timedatectl` (NTP synchronized: yes)",
        )
    if age > REAP_RAN_WITHIN_S:
        return _ops(
            name,
            WARN,
            f"the last `reap --yes` {run} in {where} was {format_duration(age)} ago "
            f"(it runs {REAP.when})",
            fix,
        )
    return _ops(name, OK, f"last `reap --yes` {run}, {format_duration(max(age, 0))} ago")
