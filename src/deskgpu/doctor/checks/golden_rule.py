"""The golden rule: no ML frameworks, CUDA toolkit or conda on the host itself."""

from __future__ import annotations

import re
from collections.abc import Iterable

from deskgpu.config import HostConfig
from deskgpu.config.doctor import Settings
from deskgpu.doctor.checks.base import (
    OK,
    WARN,
    Check,
    _Component,
    _plural,
)
from deskgpu.doctor.facts import (
    HostFacts,
)

# Distributions that must never be in a host Python (they belong in images / uv envs).
_DRIFT_DIST = re.compile(
    r"^(torch|torchvision|torchaudio|tensorflow([-_].*)?|tf-nightly.*|keras|jax|jaxlib|"
    r"jax-cuda.*|cupy(-.*)?|nvidia-(?!ml-py).*|triton|xformers|flash-attn|onnxruntime-gpu|"
    r"paddlepaddle(-gpu)?|mxnet.*|tensorrt.*|pycuda|deepspeed|vllm)$"
)

_golden = _Component("golden_rule")


def _dist_name(entry: str) -> str:
    return re.sub(r"[-_.]+", "-", entry.split("==", 1)[0]).lower()


def drift_distributions(distributions: Iterable[str]) -> list[str]:
    """The ML frameworks and CUDA wheels among `name==version` entries."""
    found = [d for d in distributions if _DRIFT_DIST.match(_dist_name(d))]
    return sorted(found, key=lambda d: (_dist_name(d).startswith("nvidia-"), _dist_name(d)))


def check_golden_rule(facts: HostFacts, config: HostConfig, s: Settings) -> list[Check]:
    return [_check_host_python(facts), _check_cuda_toolkit(facts), _check_conda(facts)]


def _check_host_python(facts: HostFacts) -> Check:
    found = []
    names: list[str] = []
    user_scope = False
    for site in facts.python_sites:
        drift = drift_distributions(site.distributions)
        if not drift:
            continue
        user_scope = user_scope or site.scope == "user"
        names.extend(_dist_name(d) for d in drift)
        shown = ", ".join(d.replace("==", " ") for d in drift[:4])
        more = f" (+{len(drift) - 4} more)" if len(drift) > 4 else ""
        found.append(f"{shown}{more} in {site.path}")
    if found:
        unique = list(dict.fromkeys(names))
        fix = f"`sudo python3 -m pip uninstall -y {' '.join(unique)}`"
        if user_scope:
            fix += f" (user site: `python3 -m pip uninstall -y --user {' '.join(unique)}`)"
        return _golden(
            "host_python",
            WARN,
            "; ".join(found) + ": ML frameworks/CUDA libraries in the host's Python",
            fix + "; jobs get them from their image or uv env",
        )
    n = len(facts.python_sites)
    return _golden(
        "host_python",
        OK,
        f"no ML frameworks or CUDA wheels in {_plural(n, 'host site-packages dir')}",
    )


def _version_tuple(text: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text or "")[:2])


def _check_cuda_toolkit(facts: HostFacts) -> Check:
    real = [t for t in facts.cuda_toolkits if not t.symlink_to]
    links = [t for t in facts.cuda_toolkits if t.symlink_to]
    if not facts.cuda_toolkits and not facts.nvcc_on_path:
        return _golden("cuda_toolkit", OK, "no CUDA toolkit under /usr/local")
    parts = []
    for t in real or facts.cuda_toolkits:
        what = f"CUDA {t.version or '?'} at {t.path}" + (" (nvcc)" if t.has_nvcc else "")
        parts.append(what)
    parts.extend(f"{t.path} -> {t.symlink_to}" for t in links)
    if facts.nvcc_on_path and not any(facts.nvcc_on_path.startswith(t.path) for t in real):
        parts.append(f"nvcc on PATH at {facts.nvcc_on_path}")
    driver_cuda = facts.nvml.cuda_driver_version
    newer = [
        t
        for t in real
        if driver_cuda and t.version and _version_tuple(t.version) > _version_tuple(driver_cuda)
    ]
    if newer:
        parts.append(f"newer than the driver supports (CUDA {driver_cuda})")
    paths = " ".join(t.path for t in real) or "/usr/local/cuda*"
    return _golden(
        "cuda_toolkit",
        WARN,
        "; ".join(parts) + ": a CUDA toolkit on the host",
        f"remove it (`sudo apt-get remove --purge 'cuda-toolkit-*'`, or `sudo rm -rf {paths}` "
        "for a runfile install); jobs get CUDA from their image",
    )


def _check_conda(facts: HostFacts) -> Check:
    if not facts.conda_installs:
        return _golden("conda", OK, "no conda installs in shared paths")
    return _golden(
        "conda",
        WARN,
        f"conda in shared paths: {', '.join(facts.conda_installs)}",
        f"remove it once no one depends on it (`sudo rm -rf {facts.conda_installs[0]}`); "
        "researchers use container images or uv",
    )
