"""Which programs the box's units run: the installed deskgpu's own, or refused with the fix.

The defaults are the interpreter running `deskgpu setup render` and the `deskgpu` script next
to it (else the one running). A path is refused (`UsageError`, exit 2) when it is not an
absolute path to an executable file, or when it lives in a source checkout: a directory above
it (as given, or with its symlinks resolved) holds `.git`, or a `pyproject.toml` naming
deskgpu. A venv's interpreter resolves into its base Python, which may sit in a git clone of
its own (pyenv's `~/.pyenv`): there only a deskgpu tree counts. Services must not run a
working tree that changes with every checkout and `uv sync`; docs/setup.md step 1 installs
deskgpu into /opt/deskgpu for them.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from deskgpu.errors import UsageError
from deskgpu.setup.render import Tools

# `name = "deskgpu"` on a line of its own: the [project] table's (no tomllib on Python 3.10).
_NAMES_DESKGPU = re.compile(r"""^\s*name\s*=\s*["']deskgpu["']\s*(#.*)?$""", re.MULTILINE)
INSTALLED = {"--python": "/opt/deskgpu/bin/python", "--deskgpu": "/opt/deskgpu/bin/deskgpu"}


def box_tools(python: str | None, deskgpu: str | None) -> Tools:
    """The Tools for `--python` / `--deskgpu` (None: the defaults), each checked."""
    py = python or sys.executable
    check(
        "--python",
        py,
        "the Python that runs the API server",
        "the Python running this command" if python is None else None,
    )
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
    fix = f"install deskgpu (docs/setup.md step 1) and pass {flag} {INSTALLED[flag]}"
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
