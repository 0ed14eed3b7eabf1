"""`deskgpu queue`: every GPU and who holds it, all users' jobs and sessions, on one screen."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

from deskgpu.cli._common import ConfigOption, JsonOption, exits_cleanly, get_config, seconds, warn
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
        typer.Option(
            "--watch",
            "-w",
            help="Refresh until Ctrl-C: in place on a terminal, else one plain frame per "
            "refresh (with --json: one document per line).",
        ),
    ] = False,
    interval: Annotated[
        float,
        typer.Option(
            "--interval",
            metavar="SECONDS",
            parser=seconds(1, 86400),
            help="Seconds between --watch refreshes.",
        ),
    ] = 5.0,
    record: Annotated[
        Path | None,
        typer.Option(
            "--record",
            metavar="FILE",
            help="Also write the snapshot shown to FILE (JSON; replay it with --snapshot).",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    snapshot: Annotated[
        Path | None,
        typer.Option(
            "--snapshot",
            metavar="FILE",
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
            metavar="USER",
            help="Only this user's jobs and sessions (GPUs: all).",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            parser=seconds(0.1, 3600),
            help="Seconds the SkyPilot half may take (each refresh, with --watch); past them it "
            "is shown as missing.",
        ),
    ] = 30.0,
    show_all: Annotated[bool, typer.Option("--all", "-a", help="Also list finished jobs.")] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Also say on stderr how the SkyPilot half was read: one request to the "
            "guard's queue endpoint, or SkyPilot's own two and why (once).",
        ),
    ] = False,
    config_path: ConfigOption = None,
) -> None:
    """Show GPUs (VRAM, util, temperature, holder), queued and running jobs, and sessions,
    with any reap notice their owners were given.

    Exit 0 when at least one half (GPUs or SkyPilot) could be read; the missing half is a
    warning on stderr. Exit 1 when neither could.
    """
    from deskgpu.deadline import Deadline

    started = Deadline.since_start(timeout)  # the user's budget: from the process start
    from deskgpu import queue as survey
    from deskgpu.errors import UsageError

    out = sys.stdout  # captured now, before the SkyPilot thread starts
    if snapshot is not None:
        if watch:
            raise UsageError("--snapshot renders one recorded snapshot: drop --watch")
        snap = survey.load(snapshot)
        _finish(snap, user, json_out, show_all, record, out, painted_gpus=False)
        return
    config = get_config(config_path)
    said = _Said(verbose)
    if watch:
        _watch(config, user, json_out, show_all, record, interval, out, timeout, said)
        return
    console = None if json_out else _console(out)

    def paint_gpus(partial: Snapshot) -> None:
        for line in survey.gpu_problems(partial):
            warn(line)
        if console is not None:
            from deskgpu.cli.render import queue as render_queue

            table = render_queue.gpu_half(partial)
            if table is not None:
                console.print(table)

    snap = survey.take(config, on_gpus=paint_gpus, deadline=started)
    said.how_read(snap)
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
    from deskgpu import queue as survey

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
        from deskgpu.cli.render import queue as render_queue

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
    said: _Said,
) -> None:
    """Refresh until Ctrl-C. A refresh that fails shows the last good frame with its error
    line; it never ends the loop. On a terminal the frame is redrawn in place; in a pipe or
    a log each refresh is written out whole, with no screen control codes."""
    from deskgpu import queue as survey
    from deskgpu.deadline import Deadline

    last = _LastGood()
    live = _LiveScreen(out, show_all) if not json_out and out.isatty() else None
    try:
        while True:
            started = time.monotonic()
            snap: Snapshot | None = None
            lines: list[str] = []
            try:
                early = live.waiting if live is not None and last.empty else None
                snap = survey.take(config, on_gpus=early, deadline=Deadline.after(timeout))
                said.how_read(snap)
                snap = survey.for_user(snap, user) if user else snap
                lines = survey.problems(snap)
                if record is not None:
                    _write(record, survey.document(snap))
            except BrokenPipeError:
                raise
            except Exception as exc:  # the loop outlives any one refresh
                lines.append(f"refresh failed: {' '.join(_lines(exc))}")
            if json_out:
                if snap is not None:
                    out.write(to_json(survey.document(snap), indent=None) + "\n")
                for line in lines if snap is None else []:
                    warn(line)
                out.flush()
            else:
                shown, stale = last.fill(snap)
                if shown is None:
                    for line in lines:
                        warn(line)
                elif live is not None:
                    live.show(shown, lines + stale)
                else:
                    _print_frame(out, shown, show_all, lines + stale)
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return
    finally:
        if live is not None:
            live.stop()


class _Said:
    """`--verbose`: how the SkyPilot half was read, said once (again only if it changes)."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.last: str | None = None

    def how_read(self, snap: Snapshot) -> None:
        from deskgpu import queue as survey

        line = survey.how_read(snap) if self.verbose else None
        if line is not None and line != self.last:
            warn(line)
            self.last = line


def _lines(exc: Exception) -> list[str]:
    from deskgpu.errors import DeskgpuError

    return exc.lines() if isinstance(exc, DeskgpuError) else [f"{type(exc).__name__}: {exc}"]


class _LastGood:
    """The last refresh that read each half, so a failed one can still show something."""

    def __init__(self) -> None:
        self.gpus: Snapshot | None = None
        self.sky: Snapshot | None = None
        self.any: Snapshot | None = None

    @property
    def empty(self) -> bool:
        return self.any is None

    def fill(self, snap: Snapshot | None) -> tuple[Snapshot | None, list[str]]:
        """What to draw: this refresh, any half it could not read taken from the last one
        that did, and a line saying how old that is. Remembers what this refresh read."""
        from dataclasses import replace

        if snap is None:
            if self.any is None:
                return None, []
            return self.any, [f"showing the last frame, of {_clock(self.any.taken_at)}"]
        stale = []
        shown = snap
        if snap.nvml.available:
            self.gpus = snap
        elif self.gpus is not None:
            shown = replace(shown, nvml=self.gpus.nvml)
            stale.append(f"GPUs as of {_clock(self.gpus.taken_at)}")
        if snap.sky.available:
            self.sky = snap
        elif self.sky is not None:
            shown = replace(shown, sky=replace(self.sky.sky, notes=[]))
            stale.append(f"jobs and sessions as of {_clock(self.sky.taken_at)}")
        self.any = shown
        return shown, ([f"showing {' and '.join(stale)}"] if stale else [])


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _frame(snap: Snapshot, show_all: bool, lines: list[str], waiting: bool = False) -> Any:
    """The screen with its problem lines (those of the refresh, not of a half kept over)."""
    from rich.console import Group
    from rich.text import Text

    from deskgpu.cli.render import queue as render_queue

    notes = [Text(f"! {line}", style="yellow") for line in lines]
    if waiting:
        table = render_queue.gpu_half(snap)
        wait = Text("… waiting for SkyPilot", style="dim")
        return Group(*([table] if table is not None else []), *notes, wait)
    return Group(render_queue.screen(snap, show_all), *notes, Text(_clock(snap.taken_at)))


def _print_frame(out: TextIO, snap: Snapshot, show_all: bool, lines: list[str]) -> None:
    """One refresh, written out whole for a pipe or a log: plain text, a blank line after."""
    console = _console(out)
    console.print(_frame(snap, show_all, lines))
    console.print()
    out.flush()


class _LiveScreen:
    """The terminal's frame, redrawn in place (rich's Live)."""

    def __init__(self, out: TextIO, show_all: bool) -> None:
        from rich.live import Live

        self.show_all = show_all
        self._live = Live(console=_console(out), auto_refresh=False)
        self._live.start()

    def waiting(self, partial: Snapshot) -> None:
        from deskgpu import queue as survey

        lines = survey.gpu_problems(partial)
        self._live.update(_frame(partial, self.show_all, lines, waiting=True), refresh=True)

    def show(self, snap: Snapshot, lines: list[str]) -> None:
        self._live.update(_frame(snap, self.show_all, lines), refresh=True)

    def stop(self) -> None:
        self._live.stop()


def _console(out: TextIO) -> Console:
    from rich.console import Console

    return Console(file=out, highlight=False, soft_wrap=False, markup=False)  # names are text


def _write(path: Path, doc: dict[str, Any]) -> None:
    from deskgpu.recorded import write_document

    write_document(path, doc, "the snapshot")
