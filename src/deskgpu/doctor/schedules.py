"""Which deskgpu commands the host's cron and systemd really run, judged against the real CLI.

A schedule counts only when its program exists and is executable and its arguments parse, with
deskgpu's own typer/click app, to the command `deskgpu setup render` schedules
(`deskgpu.setup.schedules`): `deskgpu reap --observe` is "No such option", and a regex that
found the word "observe" in it said ok while observation never ran.

`find_scheduled` is pure (the probes call it to learn which programs to look at, the checks to
judge); `parse_args` only parses (no command runs, nothing is printed).
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from deskgpu.doctor.facts import FileFact

# What cron gives a job when its file sets no PATH (Debian's and cronie's default).
CRON_DEFAULT_PATH = "/usr/bin:/bin"
# Where systemd looks for a bare ExecStart= name (systemd.service(5), "Command lines").
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
# Commands that run the command after them (`nice -n 10 deskgpu observe`).
_WRAPPERS = frozenset(
    {"env", "nice", "ionice", "timeout", "flock", "chronic", "sudo", "exec", "nohup", "setsid"}
)
_SHELLS = frozenset({"sh", "bash", "dash"})
_CONTROL = frozenset({";", "&&", "||", "|", "&", ";;", "|&"})
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_CRON_ENV = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")
_FD_BEFORE_REDIRECT = re.compile(r"(?<=\s)\d+(?=[<>])")
_SPECIAL = re.compile(r"^@(reboot|yearly|annually|monthly|weekly|daily|midnight|hourly)\b")


@dataclass(frozen=True)
class Scheduled:
    """One deskgpu command a cron line or a systemd service runs."""

    kind: str  # "cron" or "systemd"
    where: str  # "/etc/cron.d/deskgpu", "root's crontab", "/etc/systemd/system/x.service"
    line: str  # the line as written
    program: str  # the program word as written: `deskgpu`, `/opt/deskgpu/bin/deskgpu`
    args: tuple[str, ...]  # what follows it
    candidates: tuple[str, ...]  # absolute paths the program resolves to, in search order


def _words(command: str) -> list[str] | None:
    lexer = shlex.shlex(_FD_BEFORE_REDIRECT.sub("", command), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        return list(lexer)
    except ValueError:  # an unclosed quote: the shell would not run it either
        return None


def _segments(words: list[str]) -> Iterator[list[str]]:
    """Simple commands between control operators, with redirections dropped."""
    current: list[str] = []
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
            continue
        if word in _CONTROL:
            yield current
            current = []
        elif word and set(word) <= set("<>&|;"):
            skip_next = True  # a redirection: its target is not an argument
        else:
            current.append(word)
    yield current


def _base(word: str) -> str:
    return word.rsplit("/", 1)[-1]


def _deskgpu_in(words: list[str], path: str) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """(program, args, PATH) of each deskgpu command a shell command line runs."""
    for segment in _segments(words):
        rest = list(segment)
        while rest and _ASSIGNMENT.match(rest[0]):
            name, _, value = rest.pop(0).partition("=")
            if name == "PATH":
                path = value
        if not rest:
            continue
        head = _base(rest[0])
        if head in _SHELLS:
            script = next((rest[i + 1] for i, w in enumerate(rest[:-1]) if _is_c_flag(w)), None)
            inner = _words(script) if script is not None else None
            if inner:
                yield from _deskgpu_in(inner, path)
            continue
        if head in _WRAPPERS:
            at = next((i for i, w in enumerate(rest) if _base(w) == "deskgpu"), None)
            if at is None:
                continue
            rest = rest[at:]
        if _base(rest[0]) == "deskgpu":
            yield rest[0], tuple(rest[1:]), path


def _is_c_flag(word: str) -> bool:
    return word.startswith("-") and not word.startswith("--") and "c" in word


def _candidates(program: str, path: str) -> tuple[str, ...]:
    if "/" in program:
        return (program,) if program.startswith("/") else ()
    dirs = [d for d in path.split(":") if d.startswith("/")]
    return tuple(f"{d.rstrip('/')}/{program}" for d in dict.fromkeys(dirs))


def _cron_format(key: str) -> str:
    """'system' (a user field: /etc/crontab, /etc/cron.d/*), 'script' (run by run-parts from
    /etc/cron.daily/ and the like), or 'user' (a spool crontab, `crontab -l`)."""
    parts = key.removeprefix("cron:").rsplit("/", 2)
    name, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if parent == "cron.d" or (name == "crontab" and parent == "etc"):
        return "system"
    if re.fullmatch(r"cron\.(hourly|daily|weekly|monthly)", parent):
        return "script"
    return "user"


def cron_command(line: str, fmt: str) -> str | None:
    """The command part of a crontab line (None: a comment, a variable, not a job)."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    if fmt == "script":
        return stripped
    special = _SPECIAL.match(stripped)
    if not special and _CRON_ENV.match(stripped):
        return None
    n = (1 if special else 5) + (1 if fmt == "system" else 0)  # time fields, then the user
    parts = stripped.split(None, n)
    return parts[n] if len(parts) > n else None


def _cron_entries(where: str, text: str, fmt: str) -> Iterator[Scheduled]:
    path = CRON_DEFAULT_PATH
    for raw in text.splitlines():
        env = _CRON_ENV.match(raw) if fmt != "script" else None
        if env:
            if env.group(1) == "PATH":
                path = env.group(2).strip().strip("\"'")
            continue
        command = cron_command(raw, fmt)
        if command is None:
            continue
        command = command.split("%", 1)[0]  # cron turns % into newlines: stdin, not the command
        words = _words(command)
        if not words:
            continue
        for program, args, found_path in _deskgpu_in(words, path):
            yield Scheduled(
                "cron", where, raw.strip(), program, args, _candidates(program, found_path)
            )


def exec_starts(text: str | None) -> list[str]:
    """The ExecStart= command lines of a unit, without systemd's prefix characters."""
    out = []
    for line in (text or "").splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "ExecStart" and value.strip():
            out.append(value.strip().lstrip("@-:+!|"))
    return out


def _unit_entries(where: str, text: str) -> Iterator[Scheduled]:
    for command in exec_starts(text):
        words = _words(command)
        if not words:
            continue
        # systemd does not run a shell: one command, its words as written.
        head = _base(words[0])
        if head in _SHELLS or head in _WRAPPERS or head == "deskgpu":
            for program, args, path in _deskgpu_in(words, SYSTEMD_PATH):
                yield Scheduled(
                    "systemd", where, f"ExecStart={command}", program, args,
                    _candidates(program, path),
                )  # fmt: skip


def find_scheduled(
    files: dict[str, FileFact], crontab: str | None = None, user: str | None = None
) -> list[Scheduled]:
    """Every deskgpu command in the recorded cron files, crontab and systemd services."""
    found: list[Scheduled] = []
    for key, fact in sorted(files.items()):
        if key.startswith("cron:") and fact.text:
            found.extend(_cron_entries(fact.path, fact.text, _cron_format(key)))
    if crontab:
        found.extend(_cron_entries(f"{user or 'this user'}'s crontab", crontab, "user"))
    for key, fact in sorted(files.items()):
        if key.startswith("systemd:") and fact.path.endswith(".service") and fact.text:
            found.extend(_unit_entries(fact.path, fact.text))
    return found


# ---------------------------------------------------------------------------------------------
# The real CLI


@dataclass(frozen=True)
class Parsed:
    """What deskgpu's CLI makes of some arguments: the command path and every parameter."""

    command: tuple[str, ...]  # ("reap",), ("setup", "render")
    params: dict[str, Any]


@functools.lru_cache(maxsize=1)
def _cli() -> Any:
    import typer.main

    from deskgpu.cli import app

    return typer.main.get_command(app)


def parse_args(args: tuple[str, ...] | list[str]) -> Parsed | str:
    """Parse deskgpu arguments as the real CLI would; a string says why they do not run."""
    import typer
    from typer import _click  # typer's own click, which its commands raise from

    words = list(args)
    if any(w in ("-h", "--help", "--version") for w in words):
        return "it only prints help or the version"
    cmd = _cli()
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
