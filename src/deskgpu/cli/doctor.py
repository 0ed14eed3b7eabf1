"""`deskgpu doctor`: check the host keeps its golden rule and every layer is wired up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deskgpu.cli._common import (
    ConfigOption,
    JsonOption,
    exits_cleanly,
    get_config,
    print_json,
    seconds,
)
from deskgpu.errors import UsageError

# How long `--gpu-pod` waits for its pod: an image pull (a job's default image is gigabytes)
# and the pod's start; nvidia-smi itself takes a second.
GPU_POD_WAIT_S = 300.0


@exits_cleanly
def doctor_command(
    json_out: JsonOption = False,
    record: Annotated[
        Path | None,
        typer.Option(
            "--record",
            metavar="FILE",
            help="Also write the gathered host facts to FILE (JSON) for support or replay.",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    facts_file: Annotated[
        Path | None,
        typer.Option(
            "--facts",
            metavar="FILE",
            help="Judge facts recorded with --record instead of probing this host.",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            parser=seconds(0.5, 60),
            help="Seconds each probe may take (default: doctor.probe_timeout_s, else 4).",
            show_default=False,
        ),
    ] = None,
    gpu_pod: Annotated[
        bool,
        typer.Option(
            "--gpu-pod",
            help="Also start one 1-GPU pod the way a job's pod starts, wait for nvidia-smi in "
            "it, and delete it (kubernetes.gpu_pod; skipped without this).",
        ),
    ] = False,
    gpu_pod_timeout: Annotated[
        float | None,
        typer.Option(
            "--gpu-pod-timeout",
            metavar="SECONDS",
            parser=seconds(1, 3600),
            help=f"With --gpu-pod: how long to wait for the pod (default {GPU_POD_WAIT_S:g}).",
            show_default=False,
        ),
    ] = None,
    config_path: ConfigOption = None,
) -> None:
    """Check the driver, Docker + NVIDIA toolkit, k3s, SkyPilot, golden-rule drift, storage.

    Exit 0: nothing failed (warnings allowed); 3: a check failed; 1: doctor could not run.
    """
    from deskgpu.cli import grammar
    from deskgpu.doctor.report import load_facts, run_doctor, save_facts
    from deskgpu.doctor.scheduled import use_grammar

    use_grammar(grammar.running())  # scheduled deskgpu lines: judged by this CLI's grammar

    if gpu_pod and facts_file is not None:
        raise UsageError("--gpu-pod starts a pod on this host; --facts judges recorded facts")
    if gpu_pod_timeout is not None and not gpu_pod:
        raise UsageError("--gpu-pod-timeout is how long --gpu-pod waits: add --gpu-pod")
    config = get_config(config_path)
    if facts_file is not None:
        result = run_doctor(config, load_facts(facts_file), source=f"recorded {facts_file}")
    else:
        wait_s = (gpu_pod_timeout or GPU_POD_WAIT_S) if gpu_pod else None
        result = run_doctor(config, timeout_s=timeout, gpu_pod_wait_s=wait_s)
    if record is not None:
        save_facts(result.facts, record)
    if json_out:
        print_json(result.as_json())
    else:
        from rich.console import Console

        from deskgpu.cli.render.doctor import render

        render(result, Console(soft_wrap=False, highlight=False, markup=False))  # names are text
    raise typer.Exit(int(result.exit_status))
