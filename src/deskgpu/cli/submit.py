"""`deskgpu submit SPEC`: validate a job spec, expand it with the house rules, queue it."""

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
    warn,
)


@exits_cleanly
def submit_command(
    spec: Annotated[
        Path, typer.Argument(help="The job spec (YAML).", metavar="SPEC", show_default=False)
    ],
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the complete SkyPilot task YAML; submit nothing."),
    ] = False,
    json_out: JsonOption = False,
    show_secrets: Annotated[
        bool,
        typer.Option("--show-secrets", help="With --dry-run: print secret env values too."),
    ] = False,
    wait: Annotated[
        float,
        typer.Option(
            "--wait",
            metavar="SECONDS",
            parser=seconds(0, 3600),
            help="Seconds the command may take (SkyPilot's loading included) waiting for the API "
            "server's first verdict, and for a batch job's launch to pass SkyPilot's prechecks; "
            "past them it returns with the job still queued. Loading SkyPilot may add up to 5 s.",
        ),
    ] = 30.0,
    config_path: ConfigOption = None,
) -> None:
    """Submit a job spec. Batch jobs queue when the GPUs are busy; sessions print how to connect.

    Exit 0: submitted (or queued, or the dry run printed); 2: the spec, a flag or the host
    config is wrong (each problem at its file:line); 1: the API server is unreachable or
    refused the job, or the batch job failed before it started (no infrastructure).
    """
    import math

    from deskgpu.errors import UsageError

    if not math.isfinite(wait):
        raise UsageError("--wait: give a number of seconds between 0 and 3600")
    if show_secrets and not dry_run:
        raise UsageError(
            "--show-secrets only changes what --dry-run prints: add --dry-run (a submitted "
            "job's secrets go to SkyPilot, never to your terminal)"
        )
    from deskgpu.deadline import Deadline

    started = Deadline.since_start(wait)  # the user's budget: from the process start
    from deskgpu import submission
    from deskgpu.identity import current_user

    config = get_config(config_path)
    p = submission.plan(spec, config, current_user())
    for note in p.expansion.notes:
        warn(note)
    if dry_run:
        if json_out:
            from deskgpu.expand import redacted

            print_json(p.expansion.task if show_secrets else redacted(p.expansion.task))
        else:
            typer.echo(submission.task_yaml(p, show_secrets=show_secrets), nl=False)
        if p.expansion.task.get("secrets") and not show_secrets:
            warn(f"{len(p.expansion.task['secrets'])} secret value(s) shown as <redacted>")
        return
    result = submission.submit(p, config, wait_s=wait, deadline=started)
    if json_out:
        print_json(result.as_json())
    else:
        for line in result.follow_lines():
            typer.echo(line)
    raise typer.Exit(int(result.exit_status))
