"""Startup time: deskgpu's everyday commands against `sky --help`, in the same run.

    uv run python bench/startup.py [--runs N]

Prints the median wall time of each command over N runs and its ratio to `sky --help`.
`submit --dry-run` must not import SkyPilot; this is where that shows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def median_s(cmd: list[str], runs: int, env: dict[str, str]) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, env=env, cwd=ROOT)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="deskgpu-bench-")
    env = {**os.environ, "HOME": home, "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
    spec = str(ROOT / "examples" / "train-single-gpu.yaml")
    commands = {
        "sky --help": [str(BIN / "sky"), "--help"],
        "deskgpu --help": [str(BIN / "deskgpu"), "--help"],
        "deskgpu submit --dry-run": [str(BIN / "deskgpu"), "submit", spec, "--dry-run"],
    }
    median_s(commands["sky --help"], 1, env)  # warm the page cache for everyone
    results = {name: median_s(cmd, args.runs, env) for name, cmd in commands.items()}
    peer = results["sky --help"]
    print(f"median of {args.runs} runs each")
    for name, seconds in results.items():
        print(f"  {name:28s} {seconds:7.3f} s   {seconds / peer:6.3f}x sky --help")
    print(
        f"deskgpu submit --dry-run is {peer / results['deskgpu submit --dry-run']:.1f}x faster "
        "than sky --help"
    )


if __name__ == "__main__":
    main()
