"""`deskgpu observe`: one cheap observation into the reap history (run it from a timer)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deskgpu.cli._common import (
    ConfigOption,
    JsonOption,
    exits_cleanly,
    get_config,
    print_json,
    warn,
)
from deskgpu.errors import ExitStatus


@exits_cleanly
def observe_command(
    json_out: JsonOption = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print nothing unless warning.")
    ] = False,
    textfile: Annotated[
        Path | None,
        typer.Option(
            "--textfile",
            metavar="DIR",
            help="Also write DIR/deskgpu.prom for node_exporter's textfile collector.",
            file_okay=False,
            show_default=False,
        ),
    ] = None,
    config_path: ConfigOption = None,
) -> None:
    """Append one observation (GPU use, SSH/IDE connections, CPU per session) to the history.

    Meant for a systemd timer or cron every 5 minutes, as root. Also gives the first notice
    to owners of sessions that just became zombies (reap.warn_on_observe), so the grace
    period has run out by the time the weekly `deskgpu reap --yes` comes.

    Exit 0: observed; 2: bad flags or host config, or a --textfile DIR that is not a
    writable directory (or whose deskgpu.prom is not a regular file); 1: no GPU readings,
    SkyPilot unreachable, the history cannot be written, or the reap lock is broken so no
    notice can be given (said even with --quiet; the observation is kept).
    """
    from deskgpu.reap import observe

    config = get_config(config_path)
    settings = config.reap_settings
    result = observe.observe(config, settings)
    if textfile is not None:  # after the observation: a bad directory loses no sample
        from deskgpu.usage import textfile as prom

        prom.observe_textfile(textfile, result, settings)
    if not quiet:
        for note in result.notes:
            warn(note)
    for problem in result.problems:  # even with --quiet: cron mails it
        warn(problem)
    if json_out:
        print_json(result.to_dict())
    elif result.warned:
        typer.echo("warned: " + ", ".join(result.warned))
    if not quiet and not json_out:
        typer.echo(
            f"observed {result.sessions} session(s) on {result.gpus} GPU(s), "
            f"{result.unmanaged} unmanaged process(es)"
            + (f"; notices cleared: {', '.join(result.cleared)}" if result.cleared else "")
        )
    if result.problems:
        raise typer.Exit(int(ExitStatus.OUTSIDE_FAILURE))
