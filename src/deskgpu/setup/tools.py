"""Which programs the box's units run: the installed deskgpu's own, or refused with the fix.

The defaults are the interpreter running `deskgpu setup render` and the `deskgpu` script next
to it (else the one running). A path is refused (`UsageError`, exit 2) when it is not an
absolute path to an executable file, or when it lives in a source checkout: a directory above
it (as given, or with its symlinks resolved) holds `.git`, or a `pyproject.toml` naming
deskgpu. A venv's interpreter resolves into its base Python, which may sit in a git clone of
its own (pyenv's `~/.pyenv`): there only a deskgpu tree counts. Services must not run a
working tree that changes with every checkout and `uv sync`; docs/setup.md step 3 installs
deskgpu into /opt/deskgpu for them.

`--python` is also refused when the API server's account cannot run it: a directory on the
way it may not search, or an interpreter it may not execute, the venv's base Python included
(a pyenv Python under root's 0700 home). Judged from mode bits as the kernel would, symlinks
followed: by the account's uid and groups, or, before install.sh has created the account, as
any other user.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from deskgpu.errors import UsageError
from deskgpu.setup.render import Tools

# `name = "deskgpu"` on a line of its own: the [project] table's (no tomllib on Python 3.10).
_NAMES_DESKGPU = re.compile(r"""^\s*name\s*=\s*["']deskgpu["']\s*(#.*)?$""", re.MULTILINE)
INSTALLED = {"--python": "/opt/deskgpu/bin/python", "--deskgpu": "/opt/deskgpu/bin/deskgpu"}


def box_tools(python: str | None, deskgpu: str | None, server_account: str) -> Tools:
    """The Tools for `--python` / `--deskgpu` (None: the defaults), each checked; the Python
    must be one `server_account` (the API server's, `User=` of its unit) can run."""
    py = python or sys.executable
    default = "the Python running this command" if python is None else None
    check("--python", py, "the Python that runs the API server", default)
    check_runnable_by("--python", py, Account.named(server_account), default)
    if deskgpu is None:
        found = default_deskgpu(py)
        if found is None:
            raise UsageError(
                f"--deskgpu: no deskgpu command next to {py}; pass --deskgpu "
                f"{INSTALLED['--deskgpu']}, the one installed with that Python"
            )
        beside = Path(found).parent == Path(py).parent
        label = "the one next to --python" if beside else "the one running this command"
        check("--deskgpu", found, "the deskgpu command the timers run", label)
        return Tools(python=py, deskgpu=found)
    check("--deskgpu", deskgpu, "the deskgpu command the timers run", None)
    return Tools(python=py, deskgpu=deskgpu)


def default_deskgpu(python: str) -> str | None:
    """The console script installed next to `python`, else the one running, if any."""
    beside = Path(python).parent / "deskgpu"
    if beside.is_file():
        return str(beside)
    running = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if running is not None and running.name == "deskgpu" and running.is_file():
        return str(running.absolute())
    return None


def check(flag: str, path: str, what: str, default: str | None) -> None:
    """Refuse `path` for `flag` unless it is an installed executable outside any checkout."""
    given = f"{flag} {path}" + (f" (the default: {default})" if default else "")
    fix = f"install deskgpu (docs/setup.md step 3) and pass {flag} {INSTALLED[flag]}"
    if not path or not Path(path).is_absolute():
        raise UsageError(f"{given}: {what} must be an absolute path; {fix}")
    try:
        executable = Path(path).is_file() and os.access(path, os.X_OK)
        checkout = source_checkout(Path(path)) if executable else None
    except OSError as exc:  # a directory on the way this user cannot search (root's 0700 home)
        raise UsageError(
            f"{given}: cannot look at {what} ({exc.strerror or exc}); run as root, or {fix}"
        ) from None
    if not executable:
        raise UsageError(f"{given}: {what} is not an executable file; {fix}")
    if checkout is not None:
        raise UsageError(
            f"{given}: {what} lives in the source checkout {checkout}, which changes with every "
            f"checkout and `uv sync`; {fix}"
        )


def source_checkout(path: Path) -> Path | None:
    """The nearest directory above `path` (as given, then resolved) that is a source tree."""
    given = path.absolute()
    # A venv's interpreter is a link to its base Python, which may live in a git clone of
    # its own (pyenv's ~/.pyenv): the install is the venv, as given.
    in_venv = (given.parent.parent / "pyvenv.cfg").is_file()
    for candidate, git_counts in ((given, True), (path.resolve(), not in_venv)):
        for parent in candidate.parents:
            if (git_counts and (parent / ".git").exists()) or _names_deskgpu(
                parent / "pyproject.toml"
            ):
                return parent
    return None


def _names_deskgpu(pyproject: Path) -> bool:
    try:
        text = pyproject.read_text(encoding="utf-8", errors="replace")
    except OSError:  # absent, or unreadable: not a tree we can tell apart
        return False
    return _NAMES_DESKGPU.search(text) is not None


@dataclass(frozen=True)
class Account:
    """Who will run a program: an account's uid and groups, or (`uid` None, an account not
    created yet) any other user, who has the mode bits' "other" class."""

    name: str
    uid: int | None = None
    gids: frozenset[int] = frozenset()

    @classmethod
    def named(cls, name: str) -> Account:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return cls(name)
        try:
            gids = os.getgrouplist(name, entry.pw_gid)
        except OSError:
            gids = [entry.pw_gid]
        return cls(name, entry.pw_uid, frozenset(gids))

    def may_execute(self, st: os.stat_result) -> bool:
        """Execute (a file) or search (a directory) by mode bits: the first class that
        matches decides (an owner without the bit is refused even where others have it)."""
        if self.uid == 0:  # root searches anything and runs a file with any x bit
            return not stat.S_ISREG(st.st_mode) or bool(st.st_mode & 0o111)
        if self.uid is not None and st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if self.uid is not None and st.st_gid in self.gids:
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)

    def shown(self) -> str:
        if self.uid is None:
            return f"{self.name} (not created yet: judged as any other user)"
        return self.name


_MAX_LINKS = 40  # the kernel's MAXSYMLINKS


def first_denied(path: str, account: Account) -> str | None:
    """The first directory on the way to `path` that `account` may not search, or `path`'s
    program itself when it may not execute it; None: it may run it. Every symlink is
    followed as the kernel does (each hop's directories count: a venv's `bin/python` link
    into a base Python under a 0700 home is denied there). Raises `OSError` where this
    process cannot look."""
    todo = list(reversed(Path(path).parts[1:]))  # a stack of names still to walk
    current = Path("/")
    links = 0
    while todo:
        if not account.may_execute(current.stat()):
            return str(current)
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        step = current / name
        if not stat.S_ISLNK(step.lstat().st_mode):
            current = step
            continue
        links += 1
        if links > _MAX_LINKS:
            return str(step)
        target = step.readlink()
        if target.is_absolute():
            current = Path("/")
        todo.extend(reversed(target.parts[1:] if target.is_absolute() else target.parts))
    return None if account.may_execute(current.stat()) else str(current)


def check_runnable_by(flag: str, path: str, account: Account, default: str | None) -> None:
    """Refuse `path` for `flag` unless `account` may run it (see `first_denied`)."""
    from deskgpu import hostio

    given = f"{flag} {path}" + (f" (the default: {default})" if default else "")
    try:
        denied = first_denied(path, account)
        st = Path(denied).stat() if denied is not None else None
    except OSError as exc:
        raise UsageError(
            f"{given}: cannot look at the way to it ({exc.strerror or exc}); run as root"
        ) from None
    if denied is None or st is None:
        return
    what = "search" if stat.S_ISDIR(st.st_mode) else "execute"
    owner = hostio.user_name(st.st_uid) or str(st.st_uid)
    group = hostio.group_name(st.st_gid) or str(st.st_gid)
    raise UsageError(
        f"{given}: the API server's account {account.shown()} cannot run it: it may not "
        f"{what} {denied} ({stat.filemode(st.st_mode)} {owner}:{group}); install deskgpu "
        f"from a Python every account may run, e.g. /usr/bin/python3 (docs/setup.md step 3), "
        f"and pass {flag} {INSTALLED[flag]}"
    )
