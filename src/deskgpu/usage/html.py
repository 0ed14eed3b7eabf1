"""`deskgpu report --html FILE`: one self-contained page (inline SVG and CSS, no script).

Drawn by hand rather than with a plotting library: two charts of rectangles (a GPU x hour
heat-map and stacked per-user bars) are a few dozen lines of SVG, need no dependency, and
the page references nothing outside itself, so it opens the same offline, in a mail
attachment or from a file share.
"""

from __future__ import annotations

from html import escape

from deskgpu.reap.evidence import iso
from deskgpu.usage.report import HOUR, Report, text_lines

BUSY, IDLE, UNKNOWN, FREE = "#2e7d32", "#d84315", "#9e9e9e", "#f3f3f3"
UNOBSERVED = "#ffffff"
CELL_W, CELL_H, LEFT, TOP = 6, 18, 56, 22
AXIS_PX = 11  # the .axis font size
PAD = 10  # right of the widest thing drawn


def text_width(text: str) -> float:
    """An upper bound of `text`'s width in the axis font: 0.65 em a character (DejaVu Sans,
    the widest of the usual sans-serifs, draws digits 0.64 em wide; letters mostly less)."""
    return len(text) * AXIS_PX * 0.65


def heatmap(report: Report) -> str:
    """Rows: GPUs; columns: hours. Green: busy, red: held idle, pale: free, hatched: gap,
    blank: before the first observation."""
    labels = [
        (LEFT + h * CELL_W, (iso(report.hour0 + h * HOUR) or "")[:10])
        for h in range(0, report.hours, 24)
    ]
    unobserved = any(
        report.covered[h] <= 0 and report.before_first_observation(h) for h in range(report.hours)
    )
    legend = [("busy", BUSY), ("held idle", IDLE), ("unknown", UNKNOWN), ("free", FREE)]
    legend.append(("gap", "url(#gap)"))
    if unobserved:
        legend.append(("not yet observed", UNOBSERVED))
    legend_x = [float(LEFT)]
    for name, _ in legend:
        legend_x.append(legend_x[-1] + 14 + text_width(name) + 16)
    # Wide enough for the grid, the last date label and the legend: the date of a week's last
    # day once overhung a grid that ends a few hours after it, and was clipped.
    width = round(
        max(
            LEFT + report.hours * CELL_W,
            max(x + text_width(label) for x, label in labels),
            legend_x[-1] - 16,
        )
        + PAD
    )
    height = TOP + report.gpus * CELL_H + 30
    parts = [
        f'<svg id="heatmap" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="GPU by hour: busy, held idle, free, gap">',
        '<defs><pattern id="gap" width="4" height="4" patternUnits="userSpaceOnUse">'
        '<rect width="4" height="4" fill="#fff"/><path d="M0,4 L4,0" stroke="#bbb"/>'
        "</pattern></defs>",
    ]
    for x, label in labels:
        parts.append(f'<text x="{x}" y="14" class="axis">{escape(label)}</text>')
    for gpu in range(report.gpus):
        y = TOP + gpu * CELL_H
        parts.append(f'<text x="4" y="{y + 13}" class="axis">{report.gpu_label(gpu)}</text>')
        for h in range(report.hours):
            x = LEFT + h * CELL_W
            covered = report.covered[h]
            when = iso(report.hour0 + h * HOUR)
            cell = report.cells.get((gpu, h))
            if covered <= 0 and report.before_first_observation(h):
                fill, opacity, kind = UNOBSERVED, 1.0, "unobserved"
                tip = f"{report.gpu_label(gpu)} {when}: before the first observation (not counted)"
            elif covered <= 0:
                fill, opacity, kind = "url(#gap)", 1.0, "gap"
                tip = f"{report.gpu_label(gpu)} {when}: no observation (gap, not counted)"
            elif cell is None or cell.allocated_s <= 0:
                fill, opacity, kind = FREE, 1.0, "free"
                tip = f"{report.gpu_label(gpu)} {when}: free"
            else:
                share = min(1.0, cell.allocated_s / covered)
                if cell.busy_s >= max(cell.idle_s, cell.unknown_s):
                    fill, kind = BUSY, "busy"
                elif cell.idle_s >= cell.unknown_s:
                    fill, kind = IDLE, "idle"
                else:
                    fill, kind = UNKNOWN, "unknown"
                opacity = round(0.35 + 0.65 * share, 2)
                tip = (
                    f"{report.gpu_label(gpu)} {when}: {cell.busy_s / 60:.0f} min busy, "
                    f"{cell.idle_s / 60:.0f} min held idle"
                    + (f", {cell.unknown_s / 60:.0f} min unknown" if cell.unknown_s else "")
                )
            parts.append(
                f'<rect class="cell {kind}" x="{x}" y="{y}" width="{CELL_W}" '
                f'height="{CELL_H - 2}" fill="{fill}" fill-opacity="{opacity}">'
                f"<title>{escape(tip)}</title></rect>"
            )
    legend_y = TOP + report.gpus * CELL_H + 16
    for (name, fill), at in zip(legend, legend_x[:-1], strict=True):
        parts.append(
            f'<rect x="{at:.0f}" y="{legend_y - 9}" width="10" height="10" fill="{fill}" '
            'stroke="#999"/>'
        )
        parts.append(f'<text x="{at + 14:.0f}" y="{legend_y}" class="axis">{name}</text>')
    parts.append("</svg>")
    return "".join(parts)


def user_bars(report: Report) -> str:
    """One stacked bar per user: GPU-hours busy, held idle, unknown."""
    users = report.users
    scale_max = max((u.usage.allocated_s for u in users), default=0.0) or 1.0
    bar_w, row_h, left = 520, 22, 120
    height = 10 + max(1, len(users)) * row_h
    width = left + bar_w + 160
    parts = [
        f'<svg id="users" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="GPU-hours per user: busy and held idle">'
    ]
    for i, u in enumerate(users):
        y = 5 + i * row_h
        parts.append(f'<text x="4" y="{y + 14}" class="axis">{escape(u.user)}</text>')
        x = float(left)
        for kind, seconds, fill in (
            ("busy", u.usage.busy_s, BUSY),
            ("idle", u.usage.idle_s, IDLE),
            ("unknown", u.usage.unknown_s, UNKNOWN),
        ):
            w = bar_w * seconds / scale_max
            if w <= 0:
                continue
            tip = f"{u.user}: {seconds / HOUR:.2f} GPU-h {kind}"
            parts.append(
                f'<rect class="bar {kind}" x="{x:.1f}" y="{y}" width="{w:.1f}" '
                f'height="{row_h - 6}" fill="{fill}"><title>{escape(tip)}</title></rect>'
            )
            x += w
        parts.append(
            f'<text x="{x + 6:.1f}" y="{y + 14}" class="axis">'
            f"{u.usage.allocated_s / HOUR:.1f} GPU-h, {u.usage.idle_s / HOUR:.1f} idle</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def page(report: Report) -> str:
    title = f"deskgpu report {_minute(report.since)} .. {_minute(report.until)}"
    lines = text_lines(report)
    notes = "".join(f"<li>{escape(n)}</li>" for n in report.notes)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title>"
        "<style>body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}"
        "svg{display:block;margin:8px 0 24px}.axis{font:11px sans-serif;fill:#444}"
        "pre{background:#f7f7f7;padding:12px;overflow-x:auto}</style></head><body>"
        f"<h1>{escape(title)}</h1>"
        f'<p id="summary">{escape(lines[1])}</p>'
        + (f'<ul id="notes">{notes}</ul>' if notes else "")
        + "<h2>GPUs by hour</h2>"
        + heatmap(report)
        + "<h2>GPU-hours per user</h2>"
        + user_bars(report)
        + "<h2>Figures</h2><pre>"
        + escape("\n".join(lines))
        + "</pre></body></html>\n"
    )


def _minute(ts: float) -> str:
    """A title's time: to the minute (the report's own times keep their seconds)."""
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
