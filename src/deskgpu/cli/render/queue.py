"""The `deskgpu queue` screen: rich tables over a `Snapshot` (the only queue module using rich).

Ages are relative to the snapshot's `taken_at`, so a recorded snapshot renders the same
screen tomorrow as today.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.table import Table
from rich.text import Text

from deskgpu import frontends
from deskgpu import queue as survey
from deskgpu.snapshot import (
    ACTIVE_STATES,
    CANCELLED,
    DONE,
    FAILED,
    NODE_FRESH,
    QUEUED,
    RUNNING,
    STARTING,
    Gpu,
    Job,
    NodeReading,
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


# Each table's layouts, richest first: the first that fits the terminal is drawn. What
# people look for (who holds a GPU, job and session names, states, reasons) is in every
# layout and never cut; power, the model name, the VRAM bar and ages go first.
_GPU_LAYOUTS = (
    ("GPU", "Name", "VRAM used/total", "Util", "Temp", "Power", "Held by"),
    ("GPU", "Name", "VRAM used/total", "Util", "Temp", "Held by"),
    ("GPU", "Name", "VRAM", "Util", "Temp", "Held by"),
    ("GPU", "VRAM", "Util", "Temp", "Held by"),
    ("GPU", "VRAM", "Util", "Held by"),
    ("GPU", "Util", "Held by"),
)
_JOB_LAYOUTS = (
    ("ID", "Name", "User", "GPUs", "State", "Reason", "For"),
    ("ID", "Name", "User", "GPUs", "State", "Reason"),
    ("ID", "Name", "User", "State", "Reason"),
    ("Name", "User", "State", "Reason"),
)
_SESSION_LAYOUTS = (
    ("Name", "User", "GPUs", "State", "Age", "Autostop", "VRAM held", "Util", ""),
    ("Name", "User", "GPUs", "State", "Age", "VRAM held", "Util", ""),
    ("Name", "User", "GPUs", "State", "VRAM held", ""),
    ("Name", "User", "GPUs", "State", ""),
    ("Name", "User", "State", ""),
)
_RIGHT = {"GPU", "ID", "Util", "Temp", "Power"}


def _cell_width(cell: RenderableType) -> int:
    text = cell.plain if isinstance(cell, Text) else str(cell)
    return max((len(line) for line in text.split("\n")), default=0)


@dataclass
class _Fitted:
    """A table drawn in the richest of its layouts that fits the width it is given."""

    title: str
    layouts: tuple[tuple[str, ...], ...]
    rows: list[dict[str, RenderableType]]
    caption: str | None = None
    wrap: frozenset[str] = frozenset({"Reason"})  # may wrap (at spaces) to fit

    def _width(self, layout: tuple[str, ...]) -> int:
        widths = []
        for name in layout:
            longest = max((_cell_width(r.get(name, "")) for r in self.rows), default=0)
            if name in self.wrap:
                longest = min(longest, 24)  # wraps rather than widening the table
            widths.append(max(len(name), longest))
        return sum(widths) + 3 * len(layout) + 1

    def table(self, width: int) -> Table:
        layout = next((x for x in self.layouts if self._width(x) <= width), self.layouts[-1])
        table = Table(title=self.title, title_justify="left", expand=False, caption=self.caption)
        for name in layout:
            table.add_column(
                name,
                justify="right" if name in _RIGHT else "left",
                no_wrap=name not in self.wrap,  # only the long-text columns wrap
                overflow="fold",  # never "…": a cut name reads as another name
            )
        for row in self.rows:
            table.add_row(*(row.get(name, "") for name in layout))
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.table(options.max_width)


def gpu_table(snap: Snapshot, node: NodeReading | None = None) -> _Fitted:
    rows: list[dict[str, RenderableType]] = []
    gpus = snap.nvml.gpus if node is None else [g for g in snap.nvml.gpus if g.node == node.name]
    for gpu in gpus:
        if gpu.stale:
            stale = Text("STALE", style="bold yellow")
            rows.append({"GPU": str(gpu.index), "Name": _gpu_name(gpu),
                         "VRAM used/total": stale, "VRAM": stale, "Util": "?",
                         "Held by": Text("unknown (stale)", style="yellow")})  # fmt: skip
            continue
        if gpu.lost:
            lost = Text("LOST", style="bold red")
            rows.append({"GPU": str(gpu.index), "Name": gpu.name or "?",
                         "VRAM used/total": lost, "VRAM": lost, "Util": "",
                         "Held by": Text(gpu.error or "GPU is lost", style="red")})  # fmt: skip
            continue
        rows.append(
            {
                "GPU": str(gpu.index),
                "Name": _gpu_name(gpu),
                "VRAM used/total": _vram(gpu),
                "VRAM": _vram(gpu, bar=False),
                "Util": _pct(gpu.utilization_gpu_pct),
                "Temp": _temp(gpu),
                "Power": _power(gpu),
                "Held by": _holders(gpu),
            }
        )
    captions = []
    if node is not None and node.state != NODE_FRESH:
        captions.append(f"{node.state}: {node.note or 'no readings'}")
    if node is not None and node.processes not in (None, NODE_FRESH):
        captions.append(f"host processes outside pods unknown: {node.processes_note}")
    if any(g.throttle_reasons for g in gpus):
        captions.append("! = clocks throttled (thermal, power or HW slowdown)")
    title = "GPUs" if node is None else f"GPUs on {node.name}" + _node_state(node, snap.taken_at)
    caption = "\n".join(captions) or None
    return _Fitted(title, _GPU_LAYOUTS, rows, caption, wrap=frozenset({"Held by"}))


def _node_state(node: NodeReading, now: float) -> str:
    if node.state == NODE_FRESH:
        return ""
    if node.seen_at is not None:
        return f" ({node.state.upper()}: last reading {format_duration(now - node.seen_at)} ago)"
    return f" ({node.state.upper()})"


def _gpu_name(gpu: Gpu) -> str:
    name = (gpu.name or "?").replace("NVIDIA ", "")
    return name + (" [MIG]" if gpu.mig_mode else "")


def _vram(gpu: Gpu, *, bar: bool = True) -> Text:
    used, total = gpu.memory_used_mib, gpu.memory_total_mib
    if used is None or total is None or total <= 0:
        return Text("N/A")
    if not bar:
        return Text(f"{used / 1024:.1f}/{total / 1024:.0f} GiB")
    frac = min(1.0, used / total)
    filled = round(frac * BAR_WIDTH)
    style = "red" if frac > 0.9 else "yellow" if frac > 0.5 else "green"
    line = Text("█" * filled, style=style)
    line.append("░" * (BAR_WIDTH - filled), style="dim")
    line.append(f" {used / 1024:.1f}/{total / 1024:.0f} GiB")
    return line


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


def job_table(snap: Snapshot, show_finished: bool = False) -> _Fitted:
    shown = [j for j in snap.sky.jobs if show_finished or j.state in ACTIVE_STATES]
    order = {QUEUED: 1, STARTING: 0, RUNNING: 0}
    shown.sort(key=lambda j: (order.get(j.state, 2), j.queue_position or 0, j.id))
    rows: list[dict[str, RenderableType]] = []
    for job in shown:
        state = Text(job.state, style=_STATE_STYLE.get(job.state, ""))
        if job.queue_position is not None:
            state.append(f" #{job.queue_position}", style="yellow")
        rows.append(
            {
                "ID": str(job.id),
                "Name": job.name or "",
                "User": job.user or "?",
                "GPUs": job.gpus or "-",
                "State": state,
                "Reason": Text(job.reason or ""),
                "For": _job_for(job, snap.taken_at),
            }
        )
    hidden = len(snap.sky.jobs) - len(shown)
    caption = f"+{hidden} finished (`deskgpu queue --all` lists them)" if hidden else None
    return _Fitted("Jobs", _JOB_LAYOUTS, rows, caption, wrap=frozenset({"Reason", "For"}))


def _job_for(job: Job, now: float) -> str:
    if job.state == QUEUED and job.submitted_at:
        return f"waiting {format_duration(now - job.submitted_at)}"
    if job.state in (RUNNING, STARTING):
        since = job.started_at or job.submitted_at
        return f"running {format_duration(now - since)}" if since else ""
    if job.ended_at:
        return f"ended {format_duration(now - job.ended_at)} ago"
    return ""


def session_table(snap: Snapshot) -> _Fitted:
    notices = {n.cluster: n for n in current_notices(snap)}
    orphaned = {o.cluster for o in survey.orphans(snap)}
    rows: list[dict[str, RenderableType]] = []
    for row in survey.sessions(snap):
        c, use = row.cluster, row.use
        held = use.held_indexes
        gpus = ",".join(str(i) for i in held) if held else (c.gpus or "-")
        if held and use.nodes:
            gpus = f"{'+'.join(use.nodes)}:{gpus}"
        autostop = "-"
        if c.autostop_min is not None:
            autostop = f"{format_duration(c.autostop_min * 60)}" + (" (down)" if c.to_down else "")
        state = Text(c.state, style=_STATE_STYLE.get(c.state, ""))
        if c.reason:
            state.append(f" ({c.reason})", style="dim")
        rows.append(
            {
                "Name": c.name,
                "User": c.user or "?",
                "GPUs": gpus,
                "State": state,
                "Age": format_duration(snap.taken_at - c.launched_at) if c.launched_at else "?",
                "Autostop": autostop,
                "VRAM held": format_mib(use.used_memory_mib) if held else "-",
                "Util": _pct(use.max_utilization_gpu_pct) if held else "-",
                "": _flags(row.zombie_suspect, notices.get(c.name), snap.taken_at),
            }
        )
        where = frontends.via(c.labels)
        if where is not None:
            flags = rows[-1][""]
            assert isinstance(flags, Text)
            if flags.plain:
                flags.append("\n")
            flags.append(str(where), style="cyan")
            if c.name in orphaned:
                flags.append("\nlikely orphan", style="bold yellow")
    return _Fitted("Sessions", _SESSION_LAYOUTS, rows, wrap=frozenset({"", "State"}))


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
    """One GPU table; over Prometheus, one per node, a stale or missing node said so."""
    if not snap.nvml.available:
        return None
    if not snap.nvml.nodes:
        return gpu_table(snap)
    parts: list[RenderableType] = []
    for node in snap.nvml.nodes:
        if any(g.node == node.name for g in snap.nvml.gpus):
            parts.append(gpu_table(snap, node))
        else:
            line = Text(f"GPUs on {node.name}: ", style="bold")
            line.append(f"{node.state.upper()}: {node.note or 'no readings'}", style="yellow")
            parts.append(line)
    return Group(*parts)


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
