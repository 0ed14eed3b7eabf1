"""deskgpu's command line as data: its command names, and what it makes of some arguments.

doctor judges a scheduled `deskgpu ...` line by parsing it with the real app (a timer that runs
`deskgpu reap --observe` counts as nothing). It gets this grammar from the CLI
(`deskgpu.doctor.scheduled.use_grammar`), so the doctor package never imports the CLI, typer or
click; this is the one module that reads click's internals for it.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

from deskgpu.doctor.scheduled import Parsed


class TyperGrammar:
    """The grammar of a typer app, given as its root click command (`deskgpu doctor` passes
    the one it runs under: `running()`)."""

    def __init__(self, root: Any) -> None:
        self._root = root

    def commands(self) -> frozenset[str]:
        return frozenset(getattr(self._root, "commands", {}))

    def parse(self, args: tuple[str, ...] | list[str]) -> Parsed | str:
        """Parse deskgpu arguments as the real CLI would; a string says why they do not run."""
        import typer
        from typer import _click  # typer's own click, which its commands raise from

        words = list(args)
        if any(w in ("-h", "--help", "--version") for w in words):
            return "it only prints help or the version"
        cmd = self._root
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                ctx = cmd.make_context("deskgpu", words, resilient_parsing=False)
                command: list[str] = []
                while hasattr(cmd, "resolve_command"):  # a group: the next word names a command
                    rest = [*ctx._protected_args, *ctx.args]  # as TyperGroup.invoke reads them
                    if not rest:
                        return "it names no deskgpu command"
                    name, sub, rest = cmd.resolve_command(ctx, rest)
                    if sub is None or name is None:
                        return f"no such command {rest[0]!r}"
                    command.append(name)
                    ctx = sub.make_context(name, rest, parent=ctx)
                    cmd = sub
                return Parsed(tuple(command), dict(ctx.params))
        except _click.exceptions.NoArgsIsHelpError:
            return "it names no deskgpu command (it only prints help)"
        except typer.Exit:
            return "it only prints help"
        except _click.ClickException as exc:
            return exc.format_message()


def running() -> TyperGrammar:
    """The grammar of the app whose command is running now (from click's context)."""
    from typer._click.globals import get_current_context

    return TyperGrammar(get_current_context().find_root().command)
