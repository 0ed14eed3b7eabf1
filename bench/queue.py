"""How long `deskgpu queue` takes against the commands it replaces, in the same run.

    uv run python bench/queue.py                      # starts a private local API server
    uv run python bench/queue.py --endpoint URL       # uses a running one (e.g. the box's)

SkyPilot half: `deskgpu queue --json` versus `sky status -u` plus `sky jobs queue -u`, each a
fresh process (what a researcher types), after one warm-up call (a fresh server answers its
first request slowly). deskgpu is timed twice in the same run: as it runs (one request to the
guard's queue endpoint) and on its fallback path (`DESKGPU_QUEUE_VIA=skypilot`: SkyPilot's own
`/status` and `/jobs/queue/v2`, what a newer deskgpu does against an older guard). The private
server runs as the box's does (consolidation mode: the jobs controller is the API server;
deskgpu's guard loaded from `~/.sky/plugins.yaml`, with a host config of built-in defaults)
and is measured twice: empty, then with `--clusters` clusters and `--jobs` managed jobs
written into its own databases by SkyPilot's own state functions
(`global_user_state.add_or_update_cluster`, `jobs.state` from PENDING through STARTING and
RUNNING to a final state), so every side makes the server read real rows. The clusters have
no autostop and the jobs are all finished: the server has no pod or controller behind them,
and a refresh of either would be work no side asked for.

GPU half, where a GPU exists: one NVML snapshot (`deskgpu.nvml.read`, in-process) versus
`nvidia-smi --query-gpu=... --format=csv`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, this file's directory comes first on sys.path and its name hides the
# standard library's `queue` (which SkyPilot's imports need in --fill).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
BIN = Path(sys.executable).parent
QUERY = (
    "index,uuid,name,memory.used,memory.total,utilization.gpu,temperature.gpu,power.draw,"
    "power.limit,clocks_event_reasons.active,persistence_mode,mig.mode.current"
)


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run(argv: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")


def show(name: str, times: list[float]) -> float:
    med = statistics.median(times)
    print(f"  {name:<44} median {med:6.2f} s  (min {min(times):.2f}, max {max(times):.2f})")
    return med


def read_sky(argv: list[str], env: dict[str, str], via: str | None) -> dict[str, Any]:
    """`deskgpu queue --json`'s SkyPilot half, refusing a failed read (a fast failure is not a
    fast queue) or one that did not take the path being timed."""
    doc = json.loads(subprocess.run(argv, env=env, capture_output=True, text=True).stdout)
    sky: dict[str, Any] = doc["sky"]
    if not sky["available"] or sky["notes"]:
        raise SystemExit(f"deskgpu did not read SkyPilot: {sky['error'] or sky['notes']}")
    if via is not None and sky.get("via") != via:
        raise SystemExit(f"deskgpu read SkyPilot via {sky.get('via')}, not {via}: {sky}")
    return sky


def sky_half(endpoint: str, env: dict[str, str], runs: int, label: str) -> tuple[float, float]:
    """deskgpu's ratio to `sky status -u` + `sky jobs queue -u`, and its fallback path's."""
    deskgpu = [str(BIN / "deskgpu"), "queue", "--json", "--timeout", "300"]
    fallback_env = {**env, "DESKGPU_QUEUE_VIA": "skypilot"}
    sky = str(BIN / "sky")
    warm = timed(lambda: run(deskgpu, fallback_env), 1)[0]  # the server's first requests
    print(f"SkyPilot half, {label} ({endpoint}; warm-up call {warm:.1f} s), {runs} runs:")
    read = read_sky(deskgpu, env, via=None)
    read_sky(deskgpu, fallback_env, via="skypilot")
    for argv in ([sky, "status", "-u"], [sky, "jobs", "queue", "-u"]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-2000:]}")
    print(
        f"  (all answered; deskgpu read {len(read['clusters'])} clusters and "
        f"{len(read['jobs'])} managed jobs via {read.get('via')}"
        + (f": {read['fallback']}" if read.get("fallback") else "")
        + ")"
    )
    ours = show("deskgpu queue --json", timed(lambda: run(deskgpu, env), runs))
    fallback = show(
        "deskgpu queue --json (fallback: sky's own two)",
        timed(lambda: run(deskgpu, fallback_env), runs),
    )
    status = show("sky status -u", timed(lambda: run([sky, "status", "-u"], env), runs))
    jobs = show("sky jobs queue -u", timed(lambda: run([sky, "jobs", "queue", "-u"], env), runs))
    peers = status + jobs
    print(
        f"  ratio ({label}): deskgpu {ours:.2f} s / sky status+jobs queue {peers:.2f} s "
        f"= {ours / peers:.2f}; fallback {fallback:.2f} s / {peers:.2f} s = {fallback / peers:.2f}",
        flush=True,
    )
    return ours / peers, fallback / peers


def fill_state(clusters: int, jobs: int) -> None:
    """In a process whose HOME is the server's: rows through SkyPilot's own state functions."""
    import asyncio
    import random

    import sky
    from sky import global_user_state, models
    from sky.backends.cloud_vm_ray_backend import CloudVmRayResourceHandle
    from sky.jobs import state
    from sky.provision.kubernetes.utils import KubernetesInstanceType

    rng = random.Random(14)
    users = [f"user{i:02d}" for i in range(12)]
    hashes = {user: f"b{i:07x}" for i, user in enumerate(users)}  # SkyPilot user ids
    for user, user_hash in hashes.items():
        global_user_state.add_or_update_user(models.User(id=user_hash, name=user))
    for i in range(clusters):
        user = users[i % len(users)]
        os.environ["SKYPILOT_USER_ID"] = hashes[user]  # the owner add_or_update_cluster records
        name = f"{user}-dev{i:02d}"
        gpus = 1 + i % 2
        res = sky.Resources(
            infra="k8s/default",  # k3s's context
            instance_type=KubernetesInstanceType.from_resources(
                4 * gpus, 16 * gpus, gpus, "A6000"
            ).name,
            accelerators={"A6000": gpus},
            labels={"deskgpu.io/user": user, "deskgpu.io/kind": "interactive"},
        )
        handle = CloudVmRayResourceHandle(
            cluster_name=name,
            cluster_name_on_cloud=f"{name}-{i:04x}",
            cluster_yaml=None,
            launched_nodes=1,
            launched_resources=res,
        )
        global_user_state.add_or_update_cluster(name, handle, requested_resources={res}, ready=True)

    async def noop(*_args: object, **_kw: object) -> None:
        return None

    async def finish(job_id: int, name: str, resources: str, how: str) -> None:
        now = time.time()
        await state.set_starting_async(job_id, 0, f"run-{job_id}", now, resources, {}, noop)
        await state.set_started_async(job_id, 0, now, noop)
        if how == "succeeded":
            await state.set_succeeded_async(job_id, 0, now + 60, noop)
        else:
            state.set_failed(job_id, 0, state.ManagedJobStatus.FAILED, "exit code 1")

    for i in range(jobs):
        user = users[i % len(users)]
        name = f"{user}-train{i:03d}"
        resources = f"1x[A6000:{1 + i % 4}]"
        job_id = state.set_job_info_without_job_id(
            name, "default", "deskgpu submit", None, None, hashes[user]
        )
        state.set_pending(job_id, 0, name, resources, "{}")
        how = rng.choices(["succeeded", "failed", "cancelled"], [75, 15, 10])[0]
        if how == "cancelled":
            state.set_pending_cancelled(job_id)
        else:
            asyncio.run(finish(job_id, name, resources, how))
        state.scheduler_set_done(job_id, idempotent=True)
    print(f"  wrote {clusters} clusters and {jobs} managed jobs into {os.environ['HOME']}/.sky")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", help="a running SkyPilot API server (default: start one)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--fill", action="store_true", help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.fill:
        fill_state(args.clusters, args.jobs)
        return

    env = {**os.environ, "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
    env.pop("DESKGPU_QUEUE_VIA", None)
    ratios: list[tuple[float, float]] = []
    if args.endpoint:
        env["SKYPILOT_API_SERVER_ENDPOINT"] = args.endpoint
        ratios.append(sky_half(args.endpoint, env, args.runs, "as it is"))
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        import yaml
        from tests.apiserver import running_api_server

        from deskgpu.config import HostConfig
        from deskgpu.setup.render import server_plugins

        home = Path(tempfile.mkdtemp(prefix="deskgpu-bench-"))
        print(
            "starting a private SkyPilot API server (consolidation mode, deskgpu's guard) ...",
            flush=True,
        )
        config = "jobs:\n  controller:\n    consolidation_mode: true\n"
        host_config = home / "host-config.yaml"  # empty: the built-in defaults
        host_config.write_text("")
        host_config.chmod(0o644)
        plugins = yaml.safe_dump(server_plugins(HostConfig()))
        try:
            with running_api_server(
                home / "home",
                config_yaml=config,
                files={"plugins.yaml": plugins},
                extra_env={"DESKGPU_CONFIG": str(host_config)},
                deploy=True,
                warm_up=True,
            ) as url:
                env.update({"HOME": str(home / "home"), "SKYPILOT_API_SERVER_ENDPOINT": url})
                ratios.append(sky_half(url, env, args.runs, "empty server"))
                fill = [sys.executable, __file__, "--fill", "--clusters", str(args.clusters)]
                filled = subprocess.run(
                    [*fill, "--jobs", str(args.jobs)],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=600,
                )
                print(filled.stdout.strip().splitlines()[-1], flush=True)  # not SkyPilot's log
                label = f"{args.clusters} clusters, {args.jobs} managed jobs"
                ratios.append(sky_half(url, env, args.runs, label))
        finally:
            shutil.rmtree(home, ignore_errors=True)

    from deskgpu import nvml

    view = nvml.read()
    smi = shutil.which("nvidia-smi")
    if not view.available or smi is None:
        print(f"GPU half: skipped ({view.error or 'nvidia-smi not found'})")
    else:
        print(f"GPU half ({len(view.gpus)} GPU(s)), {max(args.runs, 10)} runs:")
        one = show("deskgpu.nvml.read() (in-process)", timed(nvml.read, max(args.runs, 10)))
        cmd = [smi, f"--query-gpu={QUERY}", "--format=csv"]
        other = show("nvidia-smi --query-gpu=... --format=csv", timed(lambda: run(cmd, env), 10))
        print(f"  ratio (GPU half): {one / other:.2f}")
    print("SkyPilot half ratios: " + ", ".join(f"{r:.2f}" for r, _ in ratios))
    print("SkyPilot half ratios, fallback path: " + ", ".join(f"{f:.2f}" for _, f in ratios))


if __name__ == "__main__":
    main()
