"""`deskgpu setup trial --out DIR`: a private trial of the box on any machine, no root needed.

It writes a SkyPilot API server that runs as you, with deskgpu's house rules and guard, in a
HOME of its own (DIR/home) on a loopback port that is not the box's (46590 unless `--port`),
and a shell snippet that points deskgpu and `sky` at it. The server's files are the ones
`setup render` writes for the box (the same functions, rendered for a host config whose server
account is you and whose server HOME is DIR/home), so a trial runs exactly the box's rules.

The trap it avoids: a SkyPilot API server started by hand without
`SKYPILOT_API_SERVER_LOCAL_PORT` makes its jobs controller (which runs inside the server, and
clears the endpoint variables: sky/jobs/recovery_strategy.py) look for "the local server" on
46580, find none and start a second server in the same HOME, which deletes the first one's
request database (docs/setup.md, "Try it without a box"). server.sh sets it to the trial's
port, as the box's unit does.
"""

from __future__ import annotations

import dataclasses
import getpass
import shlex
from pathlib import Path

from deskgpu.config import HostConfig
from deskgpu.setup.render import (
    SERVER_WEBSOCKET_LIMITS,
    Rendered,
    SetupFile,
    Tools,
    _yaml,
    config_document,
    endpoint,
    render,
    server_port,
)
from deskgpu.setup.render import (
    write as render_write,
)

TRIAL_PORT = 46590  # not the box's 46580: a trial never answers for the shared server
SERVER_SCRIPT = "server.sh"
ENV_SCRIPT = "env.sh"
CONFIG_FILE = "config.yaml"


def trial_config(config: HostConfig, out: Path, port: int, user: str | None = None) -> HostConfig:
    """`config` as a trial in `out`: its server on 127.0.0.1:`port` running as `user`, its
    SkyPilot HOME `out`/home and its state in `out`/state."""
    home = out / "home"
    doctor = dataclasses.replace(
        config.doctor,
        api_server_user=user or getpass.getuser(),
        skypilot_server_config=str(home / ".sky" / "config.yaml"),
    )
    return dataclasses.replace(
        config,
        api_server=f"http://127.0.0.1:{port}",
        state_dir=str(out / "state"),
        doctor=doctor,
        source=str(out / CONFIG_FILE),
    )


def trial_files(config: HostConfig, tools: Tools, out: Path, port: int) -> list[SetupFile]:
    """Every file of a trial in `out` (an absolute path), for the box described by `config`."""
    if not out.is_absolute():
        raise ValueError("out must be absolute: the scripts name their files by full path")
    trial = trial_config(config, out, port)
    home = out / "home"
    files = [
        SetupFile(
            CONFIG_FILE,
            "# A deskgpu trial's host config (deskgpu setup trial): the box's, with the trial's\n"
            "# server, state directory and server account.\n" + _yaml(config_document(trial)),
            0o644,
            "the host config the trial's server and your deskgpu read",
        )
    ]
    # The server's own files: what `setup render` installs into the server's HOME.
    for f in render(trial, tools).files:
        if f.destination is not None and Path(f.destination).is_relative_to(home):
            files.append(
                SetupFile(str(Path(f.destination).relative_to(out)), f.text, f.mode, f.purpose)
            )
    files += [
        SetupFile(SERVER_SCRIPT, server_script(trial, tools, out), 0o755, "starts the server"),
        SetupFile(ENV_SCRIPT, env_script(trial, out), 0o644, "`. env.sh`: this shell uses it"),
    ]
    return files


def server_environment(config: HostConfig, out: Path) -> dict[str, str]:
    """What the trial's server runs with (the box's unit sets the same, but HOME and the config)."""
    port = server_port(config)
    return {
        "HOME": str(out / "home"),
        "DESKGPU_CONFIG": str(out / CONFIG_FILE),
        "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
        # The jobs controller (inside this server) finds its server here, not on 46580.
        "SKYPILOT_API_SERVER_LOCAL_PORT": str(port),
        "SKYPILOT_API_SERVER_ENDPOINT": endpoint(config),
        "IS_SKYPILOT_SERVER": "true",
        **SERVER_WEBSOCKET_LIMITS,
    }


def server_script(config: HostConfig, tools: Tools, out: Path) -> str:
    q = shlex.quote
    port = server_port(config)
    env = " ".join(f"{k}={q(v)}" for k, v in server_environment(config, out).items())
    return "\n".join(
        [
            "#!/bin/sh",
            "# A deskgpu trial: a SkyPilot API server with the box's house rules, running as you,",
            f"# in the HOME {out / 'home'}, on 127.0.0.1:{port}. Written by `deskgpu setup trial`.",
            "# It runs in the foreground: Ctrl-C stops it. In another shell: . "
            + q(str(out / ENV_SCRIPT)),
            "set -eu",
            f"cd {q(str(out / 'home'))}",
            f"exec env {env} {q(tools.python)} -m sky.server.server --host 127.0.0.1 --port {port}",
            "",
        ]
    )


def env_script(config: HostConfig, out: Path) -> str:
    q = shlex.quote
    return "\n".join(
        [
            "# `. env.sh`: deskgpu and sky in this shell use the trial server (setup trial).",
            f"export SKYPILOT_API_SERVER_ENDPOINT={q(endpoint(config))}",
            "export SKYPILOT_DISABLE_LOCAL_API_SERVER=1",
            f"export DESKGPU_CONFIG={q(str(out / CONFIG_FILE))}",
            "",
        ]
    )


def write(files: list[SetupFile], out: Path) -> None:
    """Write the trial; a path that cannot be written is one line naming it (exit 2)."""
    render_write(Rendered(files=files, notes=[]), out, command="setup trial", what="the trial")
