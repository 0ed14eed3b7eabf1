"""`deskgpu doctor`: check the host keeps its golden rule and every layer is wired up."""

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
    seconds,
)


@exits_cleanly
def doctor_command(
    json_out: JsonOption = False,
    record: Annotated[
        Path | None,
        typer.Option(
            "--record",
            metavar="FILE",
            help="Also write the gathered host facts to FILE (JSON) for support or replay.",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    facts_file: Annotated[
        Path | None,
        typer.Option(
            "--facts",
            metavar="FILE",
            help="Judge facts recorded with --record instead of probing this host.",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            parser=seconds(0.5, 60),
            help="Seconds each probe may take (default: doctor.probe_timeout_s, else 4).",
            show_default=False,
        ),
    ] = None,
    config_path: ConfigOption = None,
) -> None:
    """Check the driver, Docker + NVIDIA toolkit, k3s, SkyPilot, golden-rule drift, storage.

    Exit 0: nothing failed (warnings allowed); 3: a check failed; 1: doctor could not run.
    """
    from deskgpu.doctor.report import load_facts, run_doctor, save_facts

    config = get_config(config_path)
    if facts_file is not None:
        result = run_doctor(config, load_facts(facts_file), source=f"recorded {facts_file}")
    else:
        result = run_doctor(config, timeout_s=timeout)
    if record is not None:
        save_facts(result.facts, record)
    if json_out:
        print_json(result.as_json())
    else:
        from rich.console import Console

        from deskgpu.doctor.render import render

        render(result, Console(soft_wrap=False, highlight=False, markup=False))  # names are text
    raise typer.Exit(int(result.exit_status))
