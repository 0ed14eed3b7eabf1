"""`deskgpu queue`: every GPU and who holds it, all users' jobs and sessions, on one screen."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

from deskgpu.cli._common import ConfigOption, JsonOption, exits_cleanly, get_config, warn
from deskgpu.recorded import to_json

if TYPE_CHECKING:
    from rich.console import Console

    from deskgpu.config import HostConfig
    from deskgpu.snapshot import Snapshot


@exits_cleanly
def queue_command(
    json_out: JsonOption = False,
    watch: Annotated[
        bool,
        typer.Option("--watch", "-w", help="Refresh until Ctrl-C (with --json: one line each)."),
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=1.0, help="Seconds between --watch refreshes.")
    ] = 5.0,
    record: Annotated[
        Path | None,
        typer.Option(
            "--record",
            help="Also write the snapshot shown to FILE (JSON; replay it with --snapshot).",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    snapshot: Annotated[
        Path | None,
        typer.Option(
            "--snapshot",
            help="Render a recorded snapshot; no NVML, kube or SkyPilot calls.",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    user: Annotated[
        str | None,
        typer.Option(
            "--user",
            "-u",
            help="Only this user's jobs and sessions (GPUs: all).",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option("--timeout", min=0.1, help="Seconds to wait for the SkyPilot API server."),
    ] = 30.0,
    show_all: Annotated[bool, typer.Option("--all", "-a", help="Also list finished jobs.")] = False,
    config_path: ConfigOption = None,
) -> None:
    """Show GPUs (VRAM, util, temperature, holder), queued and running jobs, and sessions,
    with any reap notice their owners were given.

    Exit 0 when at least one half (GPUs or SkyPilot) could be read; the missing half is a
    warning on stderr. Exit 1 when neither could.
    """
    from deskgpu import survey
    from deskgpu.errors import UsageError

    out = sys.stdout  # captured now: SkyPilot's thread redirects stdout while it talks
    if snapshot is not None:
        if watch:
            raise UsageError("--snapshot renders one recorded snapshot: drop --watch")
        snap = survey.load(snapshot)
        _finish(snap, user, json_out, show_all, record, out, painted_gpus=False)
        return
    config = get_config(config_path)
    if watch:
        _watch(config, user, json_out, show_all, record, interval, out, timeout)
        return
    console = None if json_out else _console(out)

    def paint_gpus(partial: Snapshot) -> None:
        for line in survey.gpu_problems(partial):
            warn(line)
        if console is not None:
            from deskgpu import render_queue

            table = render_queue.gpu_half(partial)
            if table is not None:
                console.print(table)

    snap = survey.take(config, on_gpus=paint_gpus, sky_timeout_s=timeout)
    _finish(snap, user, json_out, show_all, record, out, painted_gpus=True, console=console)


def _finish(
    snap: Snapshot,
    user: str | None,
    json_out: bool,
    show_all: bool,
    record: Path | None,
    out: TextIO,
    *,
    painted_gpus: bool,
    console: Console | None = None,
) -> None:
    from deskgpu import survey

    if user:
        snap = survey.for_user(snap, user)
    # Problems of the GPU half were printed as soon as it was known.
    lines = (
        survey.sky_problems(snap) + survey.notice_problems(snap)
        if painted_gpus
        else survey.problems(snap)
    )
    for line in lines:
        warn(line)
    doc = survey.document(snap)
    if json_out:
        out.write(to_json(doc) + "\n")
    else:
        from deskgpu import render_queue

        console = console or _console(out)
        parts = [] if painted_gpus else [render_queue.gpu_half(snap)]
        parts.extend(render_queue.sky_half(snap, show_all))
        parts.append(render_queue.notice_lines(snap))
        for part in parts:
            if part is not None:
                console.print(part)
        console.print(render_queue.summary(snap))
    if record is not None:
        _write(record, doc)
    if survey.both_missing(snap):
        raise typer.Exit(1)


def _watch(
    config: HostConfig,
    user: str | None,
    json_out: bool,
    show_all: bool,
    record: Path | None,
    interval: float,
    out: TextIO,
    timeout: float,
) -> None:
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    from deskgpu import render_queue, survey

    def frame(snap: Snapshot, waiting: bool = False) -> Group:
        notes = [Text(f"! {line}", style="yellow") for line in survey.problems(snap)]
        if waiting:
            table = render_queue.gpu_half(snap)
            extra = Text("… waiting for SkyPilot", style="dim")
            return Group(*([table] if table is not None else []), *notes, extra)
        stamp = Text(time.strftime("%H:%M:%S", time.localtime(snap.taken_at)), style="dim")
        return Group(render_queue.screen(snap, show_all), *notes, stamp)

    try:
        if json_out:
            while True:
                snap = survey.take(config, sky_timeout_s=timeout)
                snap = survey.for_user(snap, user) if user else snap
                doc = survey.document(snap)
                out.write(to_json(doc, indent=None) + "\n")
                out.flush()
                if record is not None:
                    _write(record, doc)
                time.sleep(interval)
        console = _console(out)
        with Live(console=console, auto_refresh=False) as live:
            first = True
            while True:

                def early(partial: Snapshot, show: bool = first) -> None:
                    if show:
                        live.update(frame(partial, waiting=True), refresh=True)

                snap = survey.take(config, on_gpus=early, sky_timeout_s=timeout)
                snap = survey.for_user(snap, user) if user else snap
                live.update(frame(snap), refresh=True)
                if record is not None:
                    _write(record, survey.document(snap))
                first = False
                time.sleep(interval)
    except KeyboardInterrupt:
        return


def _console(out: TextIO) -> Console:
    from rich.console import Console

    return Console(file=out, highlight=False, soft_wrap=False, markup=False)  # names are text


def _write(path: Path, doc: dict[str, Any]) -> None:
    from deskgpu.recorded import write_document

    write_document(path, doc, "the snapshot")
