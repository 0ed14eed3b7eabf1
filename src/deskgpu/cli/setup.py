"""`deskgpu setup render --out DIR`: every file the box needs, generated from the host config."""

from __future__ import annotations

import shutil
import sys
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

app = typer.Typer(
    help="Set up the box: generate its systemd units, SkyPilot server config, client "
    "profile, Kueue queues, schedules and install script from the host config.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@app.command("render")
@exits_cleanly
def render_command(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Directory to write into (paths mirror where each file is installed).",
            file_okay=False,
            show_default=False,
        ),
    ],
    python: Annotated[
        str | None,
        typer.Option(
            "--python",
            help="Python with deskgpu + SkyPilot that runs the API server "
            "(default: the one running this command).",
            show_default=False,
        ),
    ] = None,
    deskgpu: Annotated[
        str | None,
        typer.Option(
            "--deskgpu",
            help="The deskgpu command the timers run (default: the one on PATH).",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOption = False,
    config_path: ConfigOption = None,
) -> None:
    """Write the setup files for this box's host config into DIR; install with DIR/install.sh."""
    from deskgpu.setup.render import Tools, render, write

    config = get_config(config_path)
    tools = Tools(
        python=python or sys.executable,
        deskgpu=deskgpu or shutil.which("deskgpu") or "/usr/local/bin/deskgpu",
    )
    rendered = render(config, tools)
    write(rendered, out)
    for note in rendered.notes:
        warn(note)
    if json_out:
        print_json(
            {
                "out": str(out),
                "config": config.source,
                "files": [f.as_json() for f in rendered.files],
            }
        )
        return
    width = max(len(f.path) for f in rendered.files)
    for f in rendered.files:
        where = f"-> {f.destination}" if f.destination else ""
        typer.echo(f"{f.path:<{width}}  {f.purpose} {where}".rstrip())
    typer.echo(f"review, then: sudo sh {out / 'install.sh'} && deskgpu doctor")
