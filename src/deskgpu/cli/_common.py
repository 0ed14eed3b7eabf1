"""What every command shares: the error boundary, output streams and common options."""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from deskgpu.errors import DeskgpuError, ExitStatus

if TYPE_CHECKING:
    from deskgpu.config import HostConfig

F = TypeVar("F", bound=Callable[..., Any])

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="FILE",
        help="Host config file (default: $DESKGPU_CONFIG, else /etc/deskgpu/config.yaml).",
        show_default=False,
        dir_okay=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")
]


def seconds(low: float, high: float) -> Callable[[str], float]:
    """A `--timeout`-like option's parser: a finite number of seconds in [low, high].

    `nan`, `inf` and out-of-range values are usage errors (exit 2) with the range in the
    message, the same for every command (click's own float range lets `nan` through).
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"{text!r} is not a number of seconds") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise typer.BadParameter(f"{text} is not between {low:g} and {high:g} seconds")
        return value

    parse.__name__ = "SECONDS"
    return parse


def warn(message: str) -> None:
    """A diagnostic line on stderr (stdout carries the product)."""
    print(f"deskgpu: {message}", file=sys.stderr)


def print_json(document: Any) -> None:
    from deskgpu.recorded import to_json

    sys.stdout.write(to_json(document) + "\n")


def get_config(path: Path | None) -> HostConfig:
    from deskgpu.config import load_config  # jsonschema + yaml: only for commands that need them

    return load_config(path)


MAX_ERROR_LINE = 1000  # characters: an error names the problem, it does not quote a file


def error_line(text: str) -> str:
    """One error line as printed: control and other non-printable characters escaped (text
    from a server or a file never drives the terminal), and cut to a readable length."""
    out = "".join(
        ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )
    if len(out) > MAX_ERROR_LINE:
        out = out[: MAX_ERROR_LINE - 40] + f"... ({len(out) - MAX_ERROR_LINE + 40} more characters)"
    return out


def exits_cleanly(func: F) -> F:
    """The single error boundary: typed errors become one line on stderr and their exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DeskgpuError as exc:
            for line in exc.lines():
                line = error_line(line)
                print(
                    f"deskgpu: {line}" if exc.exit_status != ExitStatus.USAGE else line,
                    file=sys.stderr,
                )
            raise typer.Exit(int(exc.exit_status)) from None
        except KeyboardInterrupt:
            print("deskgpu: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
