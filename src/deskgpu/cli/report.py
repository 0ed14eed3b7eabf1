"""`deskgpu report`: GPU-hours per user and session, busy and held idle, from the history."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from deskgpu.cli._common import ConfigOption, JsonOption, exits_cleanly, get_config, print_json

if TYPE_CHECKING:
    from deskgpu.usage.report import Report


@exits_cleanly
def report_command(
    since: Annotated[
        str,
        typer.Option(
            "--since", metavar="DURATION", help="How far back: a duration like 7d, 36h, 1d12h."
        ),
    ] = "7d",
    user: Annotated[
        str | None,
        typer.Option("--user", metavar="USER", help="Only this user's figures (box totals stay)."),
    ] = None,
    json_out: JsonOption = False,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html",
            metavar="FILE",
            help="Also write one self-contained HTML page (heat-map, per-user bars).",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    config_path: ConfigOption = None,
) -> None:
    """Who used the box, who held it idle: GPU-hours allocated, busy (utilization at or over
    reap.util_threshold_pct) and held idle per user and session, peak VRAM, time waited
    Queued, reap notices and teardowns; the box's totals, busiest and idlest hours.

    Gaps in the history are listed and counted nowhere. Exit 0; 1: the history cannot be
    read; 2: usage.
    """
    import time

    from deskgpu.errors import UsageError
    from deskgpu.units import parse_duration_s
    from deskgpu.usage import report

    try:
        since_s = parse_duration_s(since)
    except ValueError:
        raise UsageError(f"--since: not a duration: {since!r} (e.g. 7d, 36h, 1d12h)") from None
    if since_s < 60:
        raise UsageError("--since: at least a minute")
    if since_s > MAX_SINCE_S:
        raise UsageError(f"--since: at most {MAX_SINCE_S // 86400}d (the history keeps less)")
    config = get_config(config_path)
    settings = config.reap_settings
    from deskgpu.config.telemetry import PROMETHEUS, source

    if source(config.telemetry) == PROMETHEUS:  # every node's GPUs
        result = report.make_cluster(config, settings, since_s=since_s, now=time.time(), user=user)
    else:
        result = report.make(settings, since_s=since_s, now=time.time(), user=user)
    if html is not None:
        write_html(html, result)
    if json_out:
        print_json(result.to_dict())
        return
    for line in report.text_lines(result):
        typer.echo(line)
    for note in result.notes:
        typer.echo(f"deskgpu: {note}", err=True)


MAX_SINCE_S = 3650 * 86400  # ten years: longer than any history deskgpu keeps


def write_html(path: Path, result: Report) -> None:
    from deskgpu.recorded import write_file
    from deskgpu.usage import html

    # As `--record` writes: a regular file replaced whole, never a FIFO or a symlink's target.
    write_file(path, html.page(result).encode("utf-8"), "the --html page")
