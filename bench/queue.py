"""How long `deskgpu queue` takes against the commands it replaces, in the same run.

    uv run python bench/queue.py                      # starts a private local API server
    uv run python bench/queue.py --endpoint URL       # uses a running one (e.g. the box's)

SkyPilot half: `deskgpu queue --json` versus `sky status -u` plus `sky jobs queue -u`, each a
fresh process (what a researcher types), after one warm-up call (a fresh server answers its
first request slowly). GPU half, where a GPU exists: one NVML snapshot (`deskgpu.nvml.read`,
in-process) versus `nvidia-smi --query-gpu=... --format=csv`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", help="a running SkyPilot API server (default: start one)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    env = {**os.environ, "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
    home = None
    if args.endpoint:
        endpoint = args.endpoint
    else:
        home = tempfile.mkdtemp(prefix="deskgpu-bench-")
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        env["HOME"] = home
        print(f"starting a local SkyPilot API server at {endpoint} ...", flush=True)
        run([str(BIN / "sky"), "api", "start", "--host", "127.0.0.1", "--port", str(port)], env)
    env["SKYPILOT_API_SERVER_ENDPOINT"] = endpoint
    deskgpu = [str(BIN / "deskgpu"), "queue", "--json", "--timeout", "300"]
    sky = str(BIN / "sky")
    try:
        warm = timed(lambda: run(deskgpu, env), 1)[0]
        print(f"SkyPilot half ({endpoint}; warm-up call took {warm:.1f} s), {args.runs} runs:")
        ours = show("deskgpu queue --json", timed(lambda: run(deskgpu, env), args.runs))
        status = show("sky status -u", timed(lambda: run([sky, "status", "-u"], env), args.runs))
        jobs = show(
            "sky jobs queue -u", timed(lambda: run([sky, "jobs", "queue", "-u"], env), args.runs)
        )
        print(
            f"  ratio: deskgpu {ours:.2f} s / sky status+jobs queue {status + jobs:.2f} s "
            f"= {ours / (status + jobs):.2f}"
        )
    finally:
        if home is not None:
            run([sky, "api", "stop"], env)
            shutil.rmtree(home, ignore_errors=True)

    from deskgpu import nvml

    view = nvml.read()
    smi = shutil.which("nvidia-smi")
    if not view.available or smi is None:
        print(f"GPU half: skipped ({view.error or 'nvidia-smi not found'})")
        return
    print(f"GPU half ({len(view.gpus)} GPU(s)), {max(args.runs, 10)} runs:")
    one = show("deskgpu.nvml.read() (in-process)", timed(nvml.read, max(args.runs, 10)))
    cmd = [smi, f"--query-gpu={QUERY}", "--format=csv"]
    other = show("nvidia-smi --query-gpu=... --format=csv", timed(lambda: run(cmd, env), 10))
    print(f"  ratio: {one / other:.2f}")


if __name__ == "__main__":
    main()
