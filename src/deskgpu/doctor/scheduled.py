"""Which deskgpu commands the host's cron and systemd really run, judged against the real CLI.

A schedule counts only when cron or systemd would really run it: a file cron reads (Debian's
cron(8) ignores cron.d names with dots, a file with a syntax error, a last line with no
newline), as root, often enough, with a program that exists, and arguments that parse, with
deskgpu's own typer/click app, to the command `deskgpu setup render` schedules
(`deskgpu.setup.schedules`): `deskgpu reap --observe` is "No such option", and a regex that
found the word "observe" in it said ok while observation never ran.

`find_scheduled` is pure (the probes call it to learn which programs to look at, the checks to
judge); `parse_args` only parses (no command runs, nothing is printed).
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from deskgpu.doctor.crontime import CronTimeError, cron_gap_s, timer_gap_s
from deskgpu.doctor.facts import FileFact

# What cron gives a job when its file sets no PATH (Debian's and cronie's default).
CRON_DEFAULT_PATH = "/usr/bin:/bin"
# Where systemd looks for a bare ExecStart= name (systemd.service(5), "Command lines").
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
# Commands that run the command after them (`nice -n 10 deskgpu observe`).
_WRAPPERS = frozenset(
    {"env", "nice", "ionice", "timeout", "flock", "chronic", "exec", "nohup", "setsid", "chrt"}
)
_AS_USER = frozenset({"sudo", "runuser", "su"})  # wrappers that change who runs it
_SHELLS = frozenset({"sh", "bash", "dash"})
_CONTROL = frozenset({";", "&&", "||", "|", "&", ";;", "|&"})
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_CRON_ENV = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")
_FD_BEFORE_REDIRECT = re.compile(r"(?<=\s)\d+(?=[<>])")
_SUBSTITUTION = re.compile(r"\$\([^()]*\)|`[^`]*`")
_SPECIAL = re.compile(r"^@[a-z]+\b")
# run-parts(8) and Debian's cron(8) skip files whose names hold anything else.
_RUN_PARTS_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# The idiom of Debian's cron jobs: run only where systemd does not (a timer does it there).
SYSTEMD_GUARD = re.compile(r"^(test|\[)\s+-[de]\s+/run/systemd/system\b")
# Where systemd reads units, highest precedence first (systemd.unit(5), "Unit File Load Path").
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/lib/systemd/system",
             "/lib/systemd/system")  # fmt: skip


@dataclass(frozen=True)
class Scheduled:
    """One deskgpu command a cron line or a systemd service runs."""

    kind: str  # "cron" or "systemd"
    where: str  # "/etc/cron.d/deskgpu", "root's crontab", "/etc/systemd/system/x.service"
    line: str  # the line as written
    program: str  # the program word as written: `deskgpu`, `/opt/deskgpu/bin/deskgpu`
    args: tuple[str, ...]  # what follows it
    candidates: tuple[str, ...]  # absolute paths the program resolves to, in search order
    user: str | None = None  # who runs it (None: not known)
    gap_s: float | None = None  # the longest wait between two runs (None: not known)
    ignored: str | None = None  # why cron or systemd never runs it (or runs it only once)
    guard: str | None = None  # the command before `||` that must fail for it to run
    settings: dict[str, dict[str, list[str]]] = field(default_factory=dict, compare=False)


def _words(command: str, *, shell: bool = True) -> list[str] | None:
    if shell:
        # A command substitution is one word to us (`>>log-$(date +%F)`: a redirect target).
        text = _SUBSTITUTION.sub("X", _FD_BEFORE_REDIRECT.sub("", command))
        lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace = " \t\n"  # not "\r": sh keeps it, so `--quiet\r` stays that
    else:
        lexer = shlex.shlex(command, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        return list(lexer)
    except ValueError:  # an unclosed quote: the shell would not run it either
        return None


def _segments(words: list[str]) -> Iterator[tuple[list[str], str | None]]:
    """Simple commands between control operators, with redirections dropped; each with the
    command before it when it runs only if that one fails (`a || b`)."""
    current: list[str] = []
    previous: list[str] = []
    op: str | None = None
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
            continue
        if word in _CONTROL:
            yield current, (" ".join(previous) if op == "||" else None)
            previous, current, op = current, [], word
        elif word and set(word) <= set("<>&|;"):
            skip_next = True  # a redirection: its target is not an argument
        else:
            current.append(word)
    yield current, (" ".join(previous) if op == "||" else None)


def _base(word: str) -> str:
    return word.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class _Found:
    program: str
    args: tuple[str, ...]
    path: str
    user: str | None
    guard: str | None


def _deskgpu_in(words: list[str], path: str, user: str | None, guard: str | None = None,
                *, shell: bool = True) -> Iterator[_Found]:  # fmt: skip
    """Each deskgpu command a command line runs, with its PATH and the user it runs as."""
    for segment, before in _segments(words) if shell else iter([(words, None)]):
        rest = list(segment)
        who = user
        while rest and _ASSIGNMENT.match(rest[0]):
            name, _, value = rest.pop(0).partition("=")
            if name == "PATH":
                path = value.replace("$PATH", path).replace("${PATH}", path)
        if not rest:
            continue
        head = _base(rest[0])
        if head in _SHELLS:
            script = next((rest[i + 1] for i, w in enumerate(rest[:-1]) if _is_c_flag(w)), None)
            inner = _words(script) if script is not None else None
            if inner:
                yield from _deskgpu_in(inner, path, who, before or guard)
            continue
        if head in _WRAPPERS or head in _AS_USER:
            at = _deskgpu_after_wrapper(rest)
            if at is None:
                continue
            wrapper = rest[:at]
            for word in wrapper:
                if word.startswith("PATH="):
                    path = word.split("=", 1)[1].replace("$PATH", path)
            if head in _AS_USER:  # sudo runs as root unless told; su and runuser name a user
                named = [
                    wrapper[i + 1] for i, w in enumerate(wrapper[:-1]) if w in ("-u", "--user")
                ]
                who = named[-1] if named else ("root" if head == "sudo" else None)
            rest = rest[at:]
        if _base(rest[0]) == "deskgpu":
            yield _Found(rest[0], tuple(rest[1:]), path, who, before or guard)


def _deskgpu_after_wrapper(words: list[str]) -> int | None:
    """Where the deskgpu command starts after a wrapper (`flock -n /run/lock/deskgpu deskgpu
    observe`: the one followed by a deskgpu command, else the last `deskgpu` word)."""
    spots = [i for i, w in enumerate(words) if i and _base(w) == "deskgpu"]
    commands = _cli_commands()
    for i in spots:
        if i + 1 < len(words) and words[i + 1] in commands:
            return i
    return spots[-1] if spots else None


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


_SCRIPT_GAP = {"hourly": 3600.0, "daily": 86400.0, "weekly": 7 * 86400.0, "monthly": 31 * 86400.0}


@dataclass(frozen=True)
class _CronLine:
    number: int
    raw: str
    when: str
    user: str | None
    command: str
    path: str = CRON_DEFAULT_PATH  # the PATH its file sets before it


def _split_cron_line(raw: str, fmt: str) -> _CronLine | str | None:
    """A job line's parts; None for a comment, blank or variable line; a string: why cron
    refuses it."""
    if not raw.strip() or raw.lstrip().startswith("#"):
        return None
    stripped = raw.strip(" \t")  # a trailing "\r" is part of the command to cron
    special = _SPECIAL.match(stripped)
    if not special and _CRON_ENV.match(stripped):
        return None
    n = 1 if special else 5
    parts = stripped.split(None, n + (1 if fmt == "system" else 0))
    if len(parts) < n + (2 if fmt == "system" else 1):
        return "too few fields" + (" (time, user, command)" if fmt == "system" else "")
    when = " ".join(parts[:n])
    user = parts[n] if fmt == "system" else None
    return _CronLine(0, raw, when, user, parts[-1])


def _unescaped_percent(command: str) -> str:
    """Cron passes what follows an unescaped `%` on stdin; `\\%` is a literal `%`."""
    cut = re.split(r"(?<!\\)%", command, maxsplit=1)[0]
    return cut.replace("\\%", "%")


def _cron_entries(where: str, text: str, fmt: str, user: str | None,
                  path: str = CRON_DEFAULT_PATH) -> Iterator[Scheduled]:  # fmt: skip
    parent, name = posixpath.split(where)
    ignored = None
    if fmt != "user" and not _RUN_PARTS_NAME.match(name):
        ignored = (
            f"cron never reads {where}: names in {parent} may hold only letters, digits, "
            "`_` and `-`"
        )
    if fmt == "script":
        yield from _script_entries(where, text, parent, path, ignored)
        return
    # Split on "\n" only: a "\r" from a Windows editor is part of the command to cron.
    lines = text.split("\n")
    unterminated = not text.endswith("\n")
    parsed: list[_CronLine] = []
    broken = None
    for number, raw in enumerate(lines, 1):
        env = _CRON_ENV.match(raw)
        if env:
            if env.group(1) == "PATH":
                path = env.group(2).strip().strip("\"'")
            continue
        got = _split_cron_line(raw, fmt)
        if got is None:
            continue
        if isinstance(got, str):
            broken = broken or f"line {number} is not a crontab line ({got})"
            continue
        try:
            cron_gap_s(got.when)
        except CronTimeError as exc:
            broken = broken or f"line {number}: {exc}"
        parsed.append(_CronLine(number, raw, got.when, got.user or user, got.command, path))
    if broken:  # Debian's cron refuses the whole file ("Syntax error, ... will be ignored")
        ignored = ignored or f"cron ignores all of {where}: {broken}"
    for line in parsed:
        why = ignored
        if why is None and unterminated and line.number == len(lines):
            why = f"{where} does not end with a newline, so cron ignores its last line"
        yield from _entries_of(line, where, why)


def _entries_of(line: _CronLine, where: str, ignored: str | None) -> Iterator[Scheduled]:
    words = _words(_unescaped_percent(line.command))
    if not words:
        return
    try:
        gap = cron_gap_s(line.when)
        once = "it runs only at boot" if line.when == "@reboot" else None
        if gap is None and once is None:
            once = f"`{line.when}` never fires"
    except CronTimeError:
        gap, once = None, None
    for found in _deskgpu_in(words, line.path, line.user):
        yield Scheduled(
            "cron", where, line.raw.strip(), found.program, found.args,
            _candidates(found.program, found.path), found.user, gap, ignored or once,
            found.guard,
        )  # fmt: skip


def _script_entries(where: str, text: str, parent: str, path: str,
                    ignored: str | None) -> Iterator[Scheduled]:  # fmt: skip
    gap = _SCRIPT_GAP.get(parent.rsplit(".", 1)[-1])
    for raw in re.sub(r"\\\n", " ", text).split("\n"):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        assign = re.match(r"^(?:export\s+)?PATH=(\S+)$", stripped)
        if assign:
            path = assign.group(1).strip("\"'").replace("$PATH", path).replace("${PATH}", path)
            continue
        words = _words(stripped)
        for found in _deskgpu_in(words or [], path, "root"):
            yield Scheduled(
                "cron", where, stripped, found.program, found.args,
                _candidates(found.program, found.path), found.user, gap, ignored, found.guard,
            )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# systemd


def unit_settings(text: str | None) -> dict[str, dict[str, list[str]]]:
    """`{section: {key: [values in order]}}` of a unit file (continuation lines joined)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in re.sub(r"\\\n", " ", text or "").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1]
            continue
        key, sep, value = stripped.partition("=")
        if sep:
            out.setdefault(section, {}).setdefault(key.strip(), []).append(value.strip())
    return out


def merged_settings(texts: list[str | None]) -> dict[str, dict[str, list[str]]]:
    """A unit and its drop-ins, in order: an empty `Key=` resets a list (systemd.unit(5))."""
    merged: dict[str, dict[str, list[str]]] = {}
    for text in texts:
        for section, keys in unit_settings(text).items():
            target = merged.setdefault(section, {})
            for key, values in keys.items():
                for value in values:
                    if value == "":
                        target[key] = []
                    else:
                        target.setdefault(key, []).append(value)
    return merged


def _units(files: dict[str, FileFact]) -> dict[str, tuple[FileFact, list[FileFact]]]:
    """Each unit name: the copy systemd loads (highest precedence) and its drop-ins."""
    copies: dict[str, list[tuple[int, FileFact]]] = {}
    dropins: dict[str, list[FileFact]] = {}
    for key, fact in sorted(files.items()):
        if not key.startswith("systemd:") or fact.text is None:
            continue
        parent, name = posixpath.split(fact.path)
        if parent.endswith(".d") and name.endswith(".conf"):
            dropins.setdefault(posixpath.basename(parent)[:-2], []).append(fact)
            continue
        rank = next((i for i, d in enumerate(UNIT_DIRS) if parent.endswith(d)), len(UNIT_DIRS))
        copies.setdefault(name, []).append((rank, fact))
    out = {}
    for name, found in copies.items():
        found.sort(key=lambda pair: pair[0])
        extra = sorted(dropins.get(name, []), key=lambda f: posixpath.basename(f.path))
        out[name] = (found[0][1], extra)
    return out


def _service_entries(unit: FileFact, dropins: list[FileFact],
                     timer: dict[str, list[str]] | None) -> Iterator[Scheduled]:  # fmt: skip
    settings = merged_settings([unit.text, *(d.text for d in dropins)])
    service = settings.get("Service", {})
    user = (service.get("User") or ["root"])[-1] or "root"
    ignored = None
    if (service.get("RemainAfterExit") or ["no"])[-1].lower() in ("yes", "true", "1", "on"):
        ignored = "RemainAfterExit=yes: the timer starts it once, then it stays `active`"
    gap: float | None = None
    if timer is not None:
        gap, problem = timer_gap_s(timer)
        ignored = ignored or (f"its timer never fires again: {problem}" if problem else None)
    for command in service.get("ExecStart", []):
        prefix = re.match(r"^[@\-:+!|]*", command).group(0)  # type: ignore[union-attr]
        words = _words(command[len(prefix) :], shell=False)
        if not words:
            continue
        if "@" in prefix:  # `@/path/prog argv0 args...`: the second word is argv[0]
            words = [words[0], *words[2:]]
        # systemd runs no shell: the words are the program's arguments as written (`>>` and
        # `||` included); only `sh -c '...'` is read as shell.
        for found in _deskgpu_in(words, SYSTEMD_PATH, user, shell=False):
            yield Scheduled(
                "systemd", unit.path, f"ExecStart={command}", found.program, found.args,
                _candidates(found.program, found.path), found.user, gap, ignored,
                found.guard, settings,
            )  # fmt: skip


def timer_of(service: str, files: dict[str, FileFact]) -> tuple[str, dict[str, list[str]]] | None:
    """The timer that starts `service` (its `Unit=`, else the same stem) and its [Timer]."""
    units = _units(files)
    by_unit: list[tuple[str, dict[str, list[str]]]] = []
    for name, (fact, dropins) in sorted(units.items()):
        if not name.endswith(".timer"):
            continue
        timer = merged_settings([fact.text, *(d.text for d in dropins)]).get("Timer", {})
        target = (timer.get("Unit") or [f"{name.removesuffix('.timer')}.service"])[-1]
        if target == service:
            by_unit.append((name, timer))
    return by_unit[0] if by_unit else None


def find_scheduled(
    files: dict[str, FileFact], crontab: str | None = None, user: str | None = None
) -> list[Scheduled]:
    """Every deskgpu command in the recorded cron files, crontab and systemd services."""
    found: list[Scheduled] = []
    system_path = CRON_DEFAULT_PATH
    crontab_fact = files.get("cron:/etc/crontab")
    if crontab_fact and crontab_fact.text:  # run-parts scripts inherit /etc/crontab's PATH
        for raw in crontab_fact.text.split("\n"):
            env = _CRON_ENV.match(raw)
            if env and env.group(1) == "PATH":
                system_path = env.group(2).strip().strip("\"'")
    for key, fact in sorted(files.items()):
        if not key.startswith("cron:") or fact.text is None:
            continue
        fmt = _cron_format(key)
        owner = posixpath.basename(fact.path) if fmt == "user" else None
        if fmt == "user" and crontab is not None and owner == user:
            continue  # the same crontab `crontab -l` showed: count it once
        path = system_path if fmt == "script" else CRON_DEFAULT_PATH
        found.extend(_cron_entries(fact.path, fact.text, fmt, owner, path))
    if crontab:
        found.extend(_cron_entries(f"{user or 'this user'}'s crontab", crontab, "user", user))
    for name, (fact, dropins) in sorted(_units(files).items()):
        if name.endswith(".service"):
            timer = timer_of(name, files)
            found.extend(_service_entries(fact, dropins, timer[1] if timer else None))
    return found


# ---------------------------------------------------------------------------------------------
# The real CLI


@dataclass(frozen=True)
class Parsed:
    """What deskgpu's CLI makes of some arguments: the command path and every parameter."""

    command: tuple[str, ...]  # ("reap",), ("setup", "render")
    params: dict[str, Any]


class CliGrammar(Protocol):
    """deskgpu's own command line, as doctor needs it: its command names, and what it makes
    of some arguments. The CLI passes its grammar in (`use_grammar`; cli/grammar.py), so the
    doctor package never imports the CLI, typer or click."""

    def commands(self) -> frozenset[str]: ...

    def parse(self, args: tuple[str, ...] | list[str]) -> Parsed | str: ...


_grammar: list[CliGrammar] = []


def use_grammar(grammar: CliGrammar) -> None:
    """Set the grammar scheduled deskgpu commands are parsed with (the CLI does, at start)."""
    _grammar[:] = [grammar]


def _the_grammar() -> CliGrammar:
    if not _grammar:
        raise RuntimeError("doctor needs the CLI's grammar: call use_grammar() first")
    return _grammar[0]


def _cli_commands() -> frozenset[str]:
    return _the_grammar().commands()


def parse_args(args: tuple[str, ...] | list[str]) -> Parsed | str:
    """Parse deskgpu arguments as the real CLI would; a string says why they do not run."""
    return _the_grammar().parse(args)
