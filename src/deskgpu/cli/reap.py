"""`deskgpu reap`: find zombie sessions and (with --yes) warn their owners and tear them down."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from deskgpu.cli._common import (
    ConfigOption,
    JsonOption,
    exits_cleanly,
    get_config,
    print_json,
    warn,
)

if TYPE_CHECKING:
    from deskgpu.reap.run import ReapResult


@exits_cleanly
def reap_command(
    yes: Annotated[
        bool,
        typer.Option("--yes", help="Act: give notices and tear zombies down. Without it: dry run."),
    ] = False,
    json_out: JsonOption = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="For cron: print only what needs attention.")
    ] = False,
    evidence: Annotated[
        Path | None,
        typer.Option(
            "--evidence",
            metavar="FILE",
            help="Re-decide a recorded evidence document (JSON or .json.gz); no live calls.",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    record: Annotated[
        Path | None,
        typer.Option(
            "--record",
            metavar="FILE",
            help="Write the evidence document this run decided from.",
            dir_okay=False,
        ),
    ] = None,
    kill_unmanaged: Annotated[
        bool,
        typer.Option(
            "--kill-unmanaged",
            help="With --yes, as root: SIGTERM (then SIGKILL) processes holding VRAM outside "
            "any SkyPilot pod.",
        ),
    ] = False,
    as_admin: Annotated[
        bool,
        typer.Option(
            "--as-admin",
            help="Dry run or --evidence: show what an admin's --yes would do (root or "
            "admin_group only). Without it a dry run shows what yours would do.",
        ),
    ] = False,
    report: Annotated[
        bool,
        typer.Option(
            "--report",
            help="Append `deskgpu report --since 7d` to the run; with --yes, notify_command "
            "sends each user their own line.",
        ),
    ] = False,
    config_path: ConfigOption = None,
) -> None:
    """Find zombie sessions: alive, holding GPUs (VRAM, or an allocation), idle for hours.
    Dry run unless --yes; a dry run shows what --yes would do for you.

    Exit 0: nothing to do (or every action succeeded); 3: a dry run found zombies you may
    act on; 1: a teardown failed or SkyPilot/NVML is unreachable; 2: usage.
    """
    from deskgpu.errors import UsageError
    from deskgpu.reap import run
    from deskgpu.state import audit

    if evidence is not None and (yes or kill_unmanaged):
        raise UsageError("--evidence replays a recorded run: it cannot be combined with --yes")
    if kill_unmanaged and not yes:
        warn("--kill-unmanaged does nothing without --yes")
    config = get_config(config_path)
    settings = config.reap_settings
    if evidence is not None:
        result = run.replay(evidence, settings, config=config, as_admin=as_admin)
        if record is not None:
            audit.write_evidence(record, result.evidence)
    else:
        result = run.reap(
            config,
            settings,
            yes=yes,
            kill_unmanaged=kill_unmanaged,
            record=record,
            as_admin=as_admin,
        )
    summary = None
    if report:
        from deskgpu.usage import weekly

        summary = weekly.after_reap(config, settings, notify=yes and evidence is None)
    if json_out:
        doc = result.to_dict()
        if summary is not None:
            doc["report"] = summary.to_dict()
        print_json(doc)
    else:
        _render(result, quiet)
        for line in summary.lines() if summary is not None else []:
            typer.echo(line)
    raise typer.Exit(int(result.exit_status))


def _render(result: ReapResult, quiet: bool) -> None:
    from deskgpu.reap.rule import Action
    from deskgpu.units import format_mib

    if not quiet or result.failures:
        for note in list(result.evidence.notes) + result.notes:
            warn(note)
    shown = [d for d in result.decisions if not quiet or d.action is not Action.KEEP]
    if shown:
        rows = [("ACTION", "SESSION", "OWNER", "KIND", "VRAM", "WHY")]
        rows += [
            (
                "skip" if d.refused and result.dry_run else d.action.value,
                d.subject,
                d.owner,
                d.kind,
                format_mib(d.vram_mib),
                f"would skip: {d.refused} ({d.action.value}: {d.summary})"
                if d.refused and result.dry_run
                else d.summary,
            )
            for d in shown
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for r in rows:
            typer.echo(
                "  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5]
            )
    for o in result.outcomes:
        if not quiet or not o.ok or o.did in ("torn-down", "killed", "warned"):
            typer.echo(f"{o.did}: {o.subject}: {o.message}")
    zombies, skip = result.actionable, result.would_skip
    if result.dry_run:
        if skip:
            typer.echo(
                f"{len(zombies)} zombie(s) you may act on; {len(skip)} more --yes would skip "
                "(others' sessions: root or admin_group; --as-admin shows the admin's view); "
                "dry run: nothing was touched"
            )
        elif zombies or not quiet:
            typer.echo(
                f"{len(zombies)} zombie(s) found; dry run: nothing was touched (--yes to act)"
            )
    elif result.failures:
        typer.echo(
            f"{len(result.failures)} action(s) failed of {len(result.outcomes)}: "
            + ", ".join(o.subject for o in result.failures)
        )
    elif not quiet:
        typer.echo(f"done: {len(result.outcomes)} action(s), all succeeded")
