"""`deskgpu logs|cancel|ssh NAME`: one of your jobs or sessions, by the name you gave it.

NAME resolution (spec name, full name, managed job id, spec file) and who may act live in
`deskgpu.skypilot.lookup`; SkyPilot calls in `deskgpu.skypilot.sdk`. Each command says on
stderr which job or session it found before it acts.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from deskgpu.cli._common import ConfigOption, exits_cleanly, get_config, seconds, warn
from deskgpu.errors import OutsideError, UsageError

if TYPE_CHECKING:
    from deskgpu.config import HostConfig
    from deskgpu.deadline import Deadline
    from deskgpu.identity import Actor
    from deskgpu.skypilot.lookup import Target

NameArgument = Annotated[
    str,
    typer.Argument(
        help="The spec's name (bert-finetune), the full name (alice-bert-finetune), a managed "
        "job id, or the spec file.",
        show_default=False,
    ),
]


def _timeout(also: str = "") -> Any:
    """`--timeout` of logs, cancel and ssh: one option type, its help per command."""
    return typer.Option(
        "--timeout",
        metavar="SECONDS",
        parser=seconds(0.1, 3600),
        help="Seconds for finding the job and for SkyPilot's answer, counted from the start "
        f"(loading SkyPilot may add up to 5 s){also}.",
    )


TimeoutOption = Annotated[float, _timeout()]
LogsTimeoutOption = Annotated[float, _timeout("; a followed log stream is not bounded")]


def _find(
    name: str, timeout: float, config_path: Path | None, verb: str, *, sessions_only: bool = False
) -> tuple[Target, HostConfig, Actor, Deadline]:
    from deskgpu.deadline import Deadline
    from deskgpu.identity import current_actor
    from deskgpu.skypilot import lookup as jobs

    deadline = Deadline.since_start(timeout)
    config = get_config(config_path)
    actor = current_actor()
    target = jobs.lookup(name, config, actor, deadline, verb=verb, sessions_only=sessions_only)
    warn(target.describe() + jobs.others_note(target, actor))
    return target, config, actor, deadline


@exits_cleanly
def logs_command(
    name: NameArgument,
    follow: Annotated[
        bool | None,
        typer.Option(
            "--follow/--no-follow",
            "-f",
            help="Keep streaming until the job ends (default: on a terminal; in a pipe, print "
            "what there is and exit).",
            show_default=False,
        ),
    ] = None,
    tail: Annotated[
        int | None,
        typer.Option(
            "--tail",
            "-n",
            min=1,
            metavar="N",
            help="Only the last N lines to start with.",
            show_default=False,
        ),
    ] = None,
    timeout: LogsTimeoutOption = 30.0,
    config_path: ConfigOption = None,
) -> None:
    """Print a job's logs: a managed job's run, or the latest job on a session."""
    from deskgpu.skypilot import lookup as jobs
    from deskgpu.skypilot import sdk as skyapi

    target, config, _, deadline = _find(name, timeout, config_path, "read the logs of")
    keep_following = sys.stdout.isatty() if follow is None else follow
    # SkyPilot's colours for a terminal only: `deskgpu logs x | grep` sees the words.
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    if not keep_following and target.state in ("Queued", "Starting"):
        # SkyPilot would wait for the job to start, follow or not: a pipe must not hang.
        warn(f"no logs yet: it has not started (`deskgpu logs {name} --follow` waits for them)")
        return
    if target.kind == jobs.MANAGED_JOB:
        skyapi.tail_logs(
            config=config,
            deadline=deadline,
            follow=keep_following,
            tail=tail,
            job_id=target.job_id,
            colour=colour,
        )
    else:
        skyapi.tail_logs(
            config=config,
            deadline=deadline,
            follow=keep_following,
            tail=tail,
            cluster=target.name,
            colour=colour,
        )


@exits_cleanly
def cancel_command(
    name: NameArgument,
    yes: Annotated[
        bool,
        typer.Option(
            "--yes", "-y", help="End a session without asking (its container's disk goes)."
        ),
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            parser=seconds(0.1, 3600),
            help="Seconds for finding the job and for SkyPilot to confirm the cancel or "
            "teardown, counted from the start (loading SkyPilot may add up to 5 s).",
        ),
    ] = 120.0,
    config_path: ConfigOption = None,
) -> None:
    """Cancel a managed job, or end a session (asks first: its container's disk goes,
    /checkpoints stays)."""
    from deskgpu.skypilot import lookup as jobs
    from deskgpu.skypilot import sdk as skyapi

    target, config, _, deadline = _find(name, timeout, config_path, "cancel")
    if target.finished:
        typer.echo(f"{target.describe()}: already finished, nothing to cancel")
        return
    if target.kind == jobs.MANAGED_JOB:
        assert target.job_id is not None
        skyapi.cancel_job(target.job_id, config, deadline)
        typer.echo(f"managed job {target.job_id} {target.name}: cancelled")
        return
    from deskgpu.house_rules import CHECKPOINT_MOUNT

    what = (
        f"ending session {target.name} deletes its container and everything on its disk "
        f"outside {CHECKPOINT_MOUNT}"
    )
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"{what}: no terminal to ask on, so rerun with --yes to confirm")
        if not typer.confirm(f"{what[0].upper()}{what[1:]}. End it?", default=False, err=True):
            warn(f"session {target.name} left as it is")
            return
    skyapi.down_cluster(target.name, config, timeout_s=max(1.0, deadline.left()))
    typer.echo(f"session {target.name}: ended ({CHECKPOINT_MOUNT} stays)")


def exec_ssh(argv: list[str]) -> NoReturn:
    """Replace this process with ssh: the terminal, signals and exit code are ssh's."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execv(argv[0], argv)  # noqa: S606 - an argument list, no shell: the point of exec'ing ssh


@exits_cleanly
def ssh_command(
    name: NameArgument,
    command: Annotated[
        list[str] | None,
        typer.Argument(
            help="A command to run there instead of a shell; put it after `--`.",
            show_default=False,
        ),
    ] = None,
    timeout: TimeoutOption = 30.0,
    config_path: ConfigOption = None,
) -> None:
    """Open a shell (or run `-- CMD...`) in one of your interactive sessions."""
    from deskgpu.skypilot import lookup as jobs
    from deskgpu.skypilot import sdk as skyapi

    target, config, _, deadline = _find(name, timeout, config_path, "ssh into", sessions_only=True)
    if target.kind == jobs.MANAGED_JOB:
        raise UsageError(
            f"{target.describe()} is a batch job: it has no ssh (`deskgpu logs "
            f"{target.job_id}` shows its output; interactive: true in a spec makes a session)"
        )
    if target.state != "Running":
        raise OutsideError(
            f"session {target.name} is {target.state.lower()}, not up yet: nothing to ssh "
            "into (see `deskgpu queue`)"
        )
    client = shutil.which("ssh")
    if client is None:
        raise OutsideError("no `ssh` client on this machine's PATH (install openssh-client)")
    entry = skyapi.ssh_config_file(target.name, config, deadline)
    exec_ssh(ssh_argv(client, str(entry), target.name, command or []))


def ssh_argv(client: str, entry: str, host: str, command: list[str]) -> list[str]:
    """ssh with SkyPilot's entry for the session as its only config; `--` ends ssh's
    options, so the (validated) host and the command are never read as ssh flags."""
    return [client, "-F", entry, "--", host, *command]
