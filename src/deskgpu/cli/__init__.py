"""The `deskgpu` command line: a thin shell over the library (one module per command)."""

from __future__ import annotations

import contextlib
import os
import sys

import typer

from deskgpu import __version__
from deskgpu.cli import doctor, jobs, observe, queue, reap, report, setup, submit

app = typer.Typer(
    name="deskgpu",
    help="The command-line face of a shared GPU box: submit jobs, see the queue, reap "
    "zombie sessions, check the host.",
    no_args_is_help=True,
    # Plain help: rendering it with rich costs ~0.4 s on every `--help`.
    rich_markup_mode=None,
    add_completion=True,  # typer's own --install-completion / --show-completion
    # Specs can carry tokens: never print locals in a traceback.
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"deskgpu {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """deskgpu: submit, queue, reap, doctor."""


# In the order a researcher meets them, then the admin's.
app.command("submit")(submit.submit_command)
app.command("queue")(queue.queue_command)
app.command("logs")(jobs.logs_command)
app.command("cancel")(jobs.cancel_command)
app.command("ssh")(jobs.ssh_command)
app.command("reap")(reap.reap_command)
app.command("observe")(observe.observe_command)
app.command("report")(report.report_command)
app.command("doctor")(doctor.doctor_command)
app.add_typer(setup.app, name="setup")


def main() -> None:
    """Console-script entry point; the last resort against tracebacks and hangs."""
    from deskgpu.deadline import mark_process_start

    mark_process_start()  # `--timeout`/`--wait` count the process start and imports too
    try:
        app(prog_name="deskgpu")
    except SystemExit as done:
        _leave(done.code)
    except BrokenPipeError:  # `deskgpu queue --watch --json | head -3`: the reader is done
        _mute_stdout()
        _leave(0)
    except Exception as exc:
        if os.environ.get("DESKGPU_DEBUG"):
            raise
        print(
            f"deskgpu: internal error: {type(exc).__name__}: {exc} "
            "(rerun with DESKGPU_DEBUG=1 and report it)",
            file=sys.stderr,
        )
        _leave(1)
    _leave(0)


def _leave(code: object) -> None:
    """Exit with `code`. A call the deadline gave up on may still be running in a thread
    (an SDK retry loop, a request to a hung server) and SkyPilot's exit hooks would wait on
    it: then flush what was said and end the process at once."""
    from deskgpu.deadline import abandoned

    status = code if isinstance(code, int) else (0 if code is None else 1)
    if isinstance(code, str):
        print(code, file=sys.stderr)
    if abandoned():
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(status)
    sys.exit(status)


def _mute_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush finds no broken pipe."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
