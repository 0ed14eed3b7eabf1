"""What every command shares: the error boundary, output streams and common options."""

from __future__ import annotations

import functools
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
        help="Host config file (default: $DESKGPU_CONFIG, else /etc/deskgpu/config.yaml).",
        show_default=False,
        dir_okay=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")
]


def warn(message: str) -> None:
    """A diagnostic line on stderr (stdout carries the product)."""
    print(f"deskgpu: {message}", file=sys.stderr)


def print_json(document: Any) -> None:
    from deskgpu.recorded import to_json

    sys.stdout.write(to_json(document) + "\n")


def get_config(path: Path | None) -> HostConfig:
    from deskgpu.config import load_config  # jsonschema + yaml: only for commands that need them

    return load_config(path)


def exits_cleanly(func: F) -> F:
    """The single error boundary: typed errors become one line on stderr and their exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DeskgpuError as exc:
            for line in exc.lines():
                print(
                    f"deskgpu: {line}" if exc.exit_status != ExitStatus.USAGE else line,
                    file=sys.stderr,
                )
            raise typer.Exit(int(exc.exit_status)) from None
        except KeyboardInterrupt:
            print("deskgpu: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
