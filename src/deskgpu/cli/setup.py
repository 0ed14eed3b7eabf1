"""`deskgpu setup render --out DIR`: every file the box needs, generated from the host config.

The host config that was read goes into DIR too (install.sh installs it as the system config);
`--python` / `--deskgpu` default to the installed deskgpu running this command and are refused
with the fix when they are not installed programs, or the Python is one the API server's
account cannot run (`deskgpu.setup.tools`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from deskgpu.cli._common import (
    ConfigOption,
    JsonOption,
    exits_cleanly,
    get_config,
    print_json,
    warn,
)

app = typer.Typer(
    help="Set up the box: generate its systemd units, SkyPilot server config, client "
    "profile, Kueue queues, schedules and install script from the host config.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@app.command("render")
@exits_cleanly
def render_command(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Directory to write into (paths mirror where each file is installed).",
            file_okay=False,
            show_default=False,
        ),
    ],
    python: Annotated[
        str | None,
        typer.Option(
            "--python",
            metavar="PATH",
            help="Absolute path of the Python with deskgpu + SkyPilot that runs the API server, "
            "e.g. /opt/deskgpu/bin/python (default: the one running this command; refused "
            "inside a source checkout, or where the server's account cannot run it).",
            show_default=False,
        ),
    ] = None,
    deskgpu: Annotated[
        str | None,
        typer.Option(
            "--deskgpu",
            metavar="PATH",
            help="Absolute path of the deskgpu command the timers run, e.g. "
            "/opt/deskgpu/bin/deskgpu (default: the one installed next to --python, else the "
            "one running; refused inside a source checkout).",
            show_default=False,
        ),
    ] = None,
    node: Annotated[
        str | None,
        typer.Option(
            "--node",
            metavar="NAME",
            help="On a cluster (the host config's `nodes:`), the node whose files to write: "
            "the server's (its box files and NFS exports) or an agent's (its k3s join, shared "
            "mounts and observe timer). Default: the server's.",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOption = False,
    config_path: ConfigOption = None,
) -> None:
    """Write the setup files for this box's host config into DIR; install with DIR/install.sh.

    Exit 0: written; 2: bad flags, host config, --python/--deskgpu, or a DIR that cannot be
    written.
    """
    from deskgpu.errors import UsageError
    from deskgpu.setup import catalog
    from deskgpu.setup.agent import pick_node, render_node
    from deskgpu.setup.render import is_config_file, server_user, write
    from deskgpu.setup.tools import box_tools

    config = get_config(config_path)
    target = pick_node(config, node)  # an unknown --node is refused before anything else
    tools = box_tools(python, deskgpu, server_user(config))
    text = None
    if is_config_file(config):
        # The headers name what was read, wherever the command ran from.
        config = dataclasses.replace(config, source=str(Path(config.source).absolute()))
        try:  # installed byte for byte: the admin's comments travel with it
            text = Path(config.source).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{config.source}: cannot copy the host config: {exc}") from None
    seen = catalog.seen_gpus(config) if target is None or target.role != "agent" else {}
    rendered = render_node(config, tools, text, seen_gpus=seen, node=node)
    write(rendered, out)
    for note in rendered.notes:
        warn(note)
    if json_out:
        print_json(
            {
                "out": str(out),
                "config": config.source,
                **({"node": target.name, "role": target.role} if target else {}),
                "files": [f.as_json() for f in rendered.files],
            }
        )
        return
    width = max(len(f.path) for f in rendered.files)
    for f in rendered.files:
        where = f"-> {f.destination}" if f.destination else ""
        typer.echo(f"{f.path:<{width}}  {f.purpose} {where}".rstrip())
    typer.echo(f"review, then: sudo sh {out / 'install.sh'} && deskgpu doctor")


@app.command("trial")
@exits_cleanly
def trial_command(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Directory for the trial: its server's HOME, host config, server.sh and env.sh.",
            file_okay=False,
            show_default=False,
        ),
    ],
    port: Annotated[
        int,
        typer.Option(
            "--port",
            metavar="PORT",
            min=1024,
            max=65535,
            help="Loopback port of the trial server (never the box's 46580).",
        ),
    ] = 46590,
    config_path: ConfigOption = None,
) -> None:
    """Write a private trial of the box into DIR: a SkyPilot API server with the house rules,
    run as you (DIR/server.sh), and `. DIR/env.sh` to point this shell's deskgpu at it.

    Exit 0: written; 2: bad flags, host config, or a DIR that cannot be written.
    """
    import sys

    from deskgpu.errors import UsageError
    from deskgpu.setup.render import DEFAULT_ENDPOINT, Tools, server_port
    from deskgpu.setup.trial import ENV_SCRIPT, SERVER_SCRIPT, trial_files, write

    box_port = server_port(dataclasses.replace(get_config(None), api_server=DEFAULT_ENDPOINT))
    if port == box_port:
        raise UsageError(f"--port {port} is the box's shared API server's: pick another")
    config = get_config(config_path)
    # The trial runs the Python running this command: a checkout's venv is fine for a trial.
    tools = Tools(python=sys.executable, deskgpu=sys.argv[0] if sys.argv else "deskgpu")
    where = out.absolute()
    files = trial_files(config, tools, where, port)
    write(files, where)
    for f in files:
        typer.echo(f"{f.path}  {f.purpose}")
    typer.echo(
        f"start it: {where / SERVER_SCRIPT}   then, in another shell: . {where / ENV_SCRIPT} "
        "&& deskgpu submit job.yaml"
    )
