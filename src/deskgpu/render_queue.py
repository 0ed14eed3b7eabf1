"""The `deskgpu queue` screen: rich tables over a `Snapshot` (the only queue module using rich).

Ages are relative to the snapshot's `taken_at`, so a recorded snapshot renders the same
screen tomorrow as today.
"""

from __future__ import annotations

import datetime as dt

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from deskgpu import survey
from deskgpu.snapshot import (
    ACTIVE_STATES,
    CANCELLED,
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    STARTING,
    Gpu,
    Job,
    ReapNotice,
    Snapshot,
    current_notices,
)
from deskgpu.units import format_duration, format_mib

BAR_WIDTH = 10
HOT_C = 85  # a temperature worth a colour even without a throttle flag
_STATE_STYLE = {
    QUEUED: "yellow",
    STARTING: "cyan",
    RUNNING: "green",
    DONE: "dim",
    FAILED: "red",
    CANCELLED: "dim",
}


def gpu_table(snap: Snapshot) -> Table:
    table = Table(title="GPUs", title_justify="left", expand=False)
    for name, justify in (
        ("GPU", "right"),
        ("Name", "left"),
        ("VRAM used/total", "left"),
        ("Util", "right"),
        ("Temp", "right"),
        ("Power", "right"),
        ("Held by", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for gpu in snap.nvml.gpus:
        if gpu.lost:
            table.add_row(
                str(gpu.index),
                gpu.name or "?",
                Text("LOST", style="bold red"),
                "",
                "",
                "",
                Text(gpu.error or "GPU is lost", style="red"),
            )
            continue
        table.add_row(
            str(gpu.index),
            _gpu_name(gpu),
            _vram(gpu),
            _pct(gpu.utilization_gpu_pct),
            _temp(gpu),
            _power(gpu),
            _holders(gpu),
        )
    if any(g.throttle_reasons for g in snap.nvml.gpus):
        table.caption = "! = clocks throttled (thermal, power or HW slowdown)"
    return table


def _gpu_name(gpu: Gpu) -> str:
    name = (gpu.name or "?").replace("NVIDIA ", "")
    return name + (" [MIG]" if gpu.mig_mode else "")


def _vram(gpu: Gpu) -> Text:
    used, total = gpu.memory_used_mib, gpu.memory_total_mib
    if used is None or total is None or total <= 0:
        return Text("N/A")
    frac = min(1.0, used / total)
    filled = round(frac * BAR_WIDTH)
    style = "red" if frac > 0.9 else "yellow" if frac > 0.5 else "green"
    bar = Text("█" * filled, style=style)
    bar.append("░" * (BAR_WIDTH - filled), style="dim")
    bar.append(f" {used / 1024:.1f}/{total / 1024:.0f} GiB")
    return bar


def _pct(value: int | None) -> str:
    return "N/A" if value is None else f"{value}%"


def _temp(gpu: Gpu) -> Text:
    if gpu.temperature_c is None:
        text = Text("N/A")
    else:
        hot = gpu.temperature_c >= HOT_C
        text = Text(f"{gpu.temperature_c}°C", style="red" if hot else "")
    if gpu.throttle_reasons:
        text.append(" !", style="bold red")
        text.append(",".join(gpu.throttle_reasons), style="red")
    return text


def _power(gpu: Gpu) -> str:
    if gpu.power_draw_w is None:
        return "N/A"
    if gpu.power_limit_w is None:
        return f"{gpu.power_draw_w:.0f} W"
    return f"{gpu.power_draw_w:.0f}/{gpu.power_limit_w:.0f} W"


def _holders(gpu: Gpu) -> Text:
    if gpu.allocated_to is not None and not gpu.processes:
        # Held through the device plugin with nothing running on it: nobody else can get it.
        return Text(f"{gpu.allocated_to.label} (allocated, idle)", style="yellow")
    if not gpu.processes:
        return Text("free", style="green")
    text = Text()
    for i, holder in enumerate(gpu.holders):
        if i:
            text.append("\n")
        style = {"unmanaged": "magenta", "hidden": "dim"}.get(holder.kind, "")
        text.append(holder.label, style=style)
    owner = gpu.allocated_to
    if owner is not None and owner.label not in {h.label for h in gpu.holders}:
        text.append(f"\n{owner.label} (allocated)", style="yellow")
    unattributed = sum(1 for p in gpu.processes if p.holder is None)
    if unattributed:
        text.append(("\n" if gpu.holders else "") + f"{unattributed} process(es)", style="dim")
    return text


def job_table(snap: Snapshot, show_finished: bool = False) -> Table:
    table = Table(title="Jobs", title_justify="left")
    for name in ("ID", "Name", "User", "GPUs", "State", "Reason", "For"):
        table.add_column(name, justify="right" if name == "ID" else "left")
    shown = [j for j in snap.sky.jobs if show_finished or j.state in ACTIVE_STATES]
    order = {QUEUED: 1, STARTING: 0, RUNNING: 0}
    shown.sort(key=lambda j: (order.get(j.state, 2), j.queue_position or 0, j.id))
    for job in shown:
        state = Text(job.state, style=_STATE_STYLE.get(job.state, ""))
        if job.queue_position is not None:
            state.append(f" #{job.queue_position}", style="yellow")
        table.add_row(
            str(job.id),
            job.name or "",
            job.user or "?",
            job.gpus or "-",
            state,
            Text(job.reason or "", overflow="fold"),
            _job_for(job, snap.taken_at),
        )
    hidden = len(snap.sky.jobs) - len(shown)
    if hidden:
        table.caption = f"+{hidden} finished (see --json)"
    return table


def _job_for(job: Job, now: float) -> str:
    if job.state == QUEUED and job.submitted_at:
        return f"waiting {format_duration(now - job.submitted_at)}"
    if job.state in (RUNNING, STARTING):
        since = job.started_at or job.submitted_at
        return f"running {format_duration(now - since)}" if since else ""
    if job.ended_at:
        return f"ended {format_duration(now - job.ended_at)} ago"
    return ""


def session_table(snap: Snapshot) -> Table:
    table = Table(title="Sessions", title_justify="left")
    for name in ("Name", "User", "GPUs", "State", "Age", "Autostop", "VRAM held", "Util", ""):
        table.add_column(name)
    notices = {n.cluster: n for n in current_notices(snap)}
    for row in survey.sessions(snap):
        c, use = row.cluster, row.use
        held = use.held_indexes
        gpus = ",".join(str(i) for i in held) if held else (c.gpus or "-")
        autostop = "-"
        if c.autostop_min is not None:
            autostop = f"{format_duration(c.autostop_min * 60)}" + (" (down)" if c.to_down else "")
        state = Text(c.state, style=_STATE_STYLE.get(c.state, ""))
        if c.reason:
            state.append(f" ({c.reason})", style="dim")
        table.add_row(
            c.name,
            c.user or "?",
            gpus,
            state,
            format_duration(snap.taken_at - c.launched_at) if c.launched_at else "?",
            autostop,
            format_mib(use.used_memory_mib) if held else "-",
            _pct(use.max_utilization_gpu_pct) if held else "-",
            _flags(row.zombie_suspect, notices.get(c.name), snap.taken_at),
        )
    return table


def _flags(zombie_suspect: bool, notice: ReapNotice | None, now: float) -> Text:
    text = Text("zombie suspect", style="bold red") if zombie_suspect else Text()
    if notice is not None:
        text.append(("\n" if zombie_suspect else "") + notice_text(notice, now), style="red")
    return text


def notice_text(notice: ReapNotice, now: float) -> str:
    """`reap notice: torn down after Nov 30 09:00 UTC` (`(due)` once that is past)."""
    when = dt.datetime.fromtimestamp(notice.reap_after, tz=dt.timezone.utc)
    due = " (due)" if notice.reap_after <= now else ""
    return f"reap notice: torn down after {when:%b %d %H:%M} UTC{due}"


def notice_lines(snap: Snapshot) -> RenderableType | None:
    """Notices of sessions the Sessions table does not show (managed jobs, or no SkyPilot)."""
    shown = {c.name for c in snap.sky.clusters} if snap.sky.available else set()
    rest = [n for n in current_notices(snap) if n.cluster not in shown]
    if not rest:
        return None
    text = Text()
    for i, n in enumerate(rest):
        text.append(("\n" if i else "") + f"{n.cluster} ({n.owner}): ", style="bold")
        text.append(notice_text(n, snap.taken_at), style="red")
    return text


def gpu_half(snap: Snapshot) -> RenderableType | None:
    return gpu_table(snap) if snap.nvml.available else None


def sky_half(snap: Snapshot, show_finished: bool = False) -> list[RenderableType]:
    if not snap.sky.available:
        return []
    parts: list[RenderableType] = []
    if any(show_finished or j.state in ACTIVE_STATES for j in snap.sky.jobs):
        parts.append(job_table(snap, show_finished))
    else:
        finished = f" ({len(snap.sky.jobs)} finished: --all)" if snap.sky.jobs else ""
        parts.append(Text(f"Jobs: none queued or running{finished}"))
    if snap.sky.clusters:
        parts.append(session_table(snap))
    return parts


def summary(snap: Snapshot) -> Text:
    return Text(survey.summarize(snap).line(), style="bold")


def screen(snap: Snapshot, show_finished: bool = False) -> Group:
    """The whole screen at once (`--snapshot`, `--watch`)."""
    parts: list[RenderableType] = []
    gpus = gpu_half(snap)
    if gpus is not None:
        parts.append(gpus)
    parts.extend(sky_half(snap, show_finished))
    notices = notice_lines(snap)
    if notices is not None:
        parts.append(notices)
    parts.append(summary(snap))
    return Group(*parts)
