"""Real Unix accounts for tests of who is asking (the guard binds every request to one).

`ensure_accounts()` creates, when missing, the researchers `alice`, `bob` and `carol` (carol in
the admin group `deskgpu-admins`) and the front end's account `transformerlab` (a system
account, as Transformer Lab's own installer makes one), with no home and no login shell.
Only root can; elsewhere the tests that need them skip. CI runs as root. Accounts that
already exist are used as they are (a second run, or a developer's own `alice`), as long as
the researchers are ordinary accounts.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess

import pytest

RESEARCHERS = ("alice", "bob", "carol")
ADMIN_GROUP = "deskgpu-admins"
ADMIN = "carol"
FRONTEND = "transformerlab"
NOLOGIN = "/usr/sbin/nologin"


def _run(args: list[str]) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed: {done.stderr.strip()}", pytrace=False)


def ensure_accounts() -> dict[str, int]:
    """The accounts' uids, creating what is missing (root only; others skip)."""
    if os.geteuid() != 0:
        pytest.skip("needs real Unix accounts: run as root (CI does) to create them")
    try:
        grp.getgrnam(ADMIN_GROUP)
    except KeyError:
        _run(["groupadd", ADMIN_GROUP])
    for name in RESEARCHERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            extra = ["-G", ADMIN_GROUP] if name == ADMIN else []
            _run(["useradd", "-M", "-N", "-s", NOLOGIN, *extra, name])
    if ADMIN not in grp.getgrnam(ADMIN_GROUP).gr_mem:
        _run(["usermod", "-a", "-G", ADMIN_GROUP, ADMIN])
    try:
        pwd.getpwnam(FRONTEND)
    except KeyError:
        _run(["useradd", "--system", "-M", "-N", "-s", NOLOGIN, FRONTEND])
    uids = {n: pwd.getpwnam(n).pw_uid for n in (*RESEARCHERS, FRONTEND)}
    low = [n for n in RESEARCHERS if uids[n] < 1000]
    if low:
        pytest.skip(f"accounts {low} exist here as system accounts, not researchers")
    return uids
