"""`doctor --gpu-pod`: the one 1-GPU pod doctor starts, and how to read what became of it.

The pod is a job's pod in miniature: the house rules shape a task for it (`apply_house_rules`:
its owner labels, the jobs' service account as `remote_identity`, the `/data` and
`/checkpoints` mounts in `pod_config`), SkyPilot 0.14's way of building the pod is followed
(pod_config merged into the pod, `runtimeClassName: nvidia` when that RuntimeClass exists:
sky/provision/kubernetes/instance.py `_configure_runtime_class`), and its one container asks
for `nvidia.com/gpu: 1` and runs `nvidia-smi -L`. Pure: the probe (`probes.probe_gpu_pod`) sends
the manifest and polls, the check (`checks.gpu_pod`) judges; both read the pod through here.
"""

from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from deskgpu.config import HostConfig
from deskgpu.house_rules import BATCH, MAIN_CONTAINER, apply_house_rules
from deskgpu.kubenames import JOBS_NAMESPACE, NVIDIA_RUNTIME_CLASS
from deskgpu.labels import LABEL_PREFIX

GPU_RESOURCE = "nvidia.com/gpu"
# Every doctor GPU pod carries this label: a run killed before its cleanup leaves a pod the
# next run finds by it (and `kubectl delete pod -l deskgpu.io/doctor=gpu-pod` removes by hand).
DOCTOR_LABEL = f"{LABEL_PREFIX}/doctor"
DOCTOR_LABEL_VALUE = "gpu-pod"
SELECTOR = f"{DOCTOR_LABEL}={DOCTOR_LABEL_VALUE}"
POD_PREFIX = "deskgpu-doctor-gpu-"
# The owner the house rules shape the pod for: its checkpoint mount is
# `<checkpoint_root>/deskgpu-doctor` (the kubelet creates that directory when it is missing).
DOCTOR_USER = "deskgpu-doctor"
# When the host config names no default_image: the smallest CUDA image (the `base` flavour, no
# CUDA libraries; nvidia-smi itself comes from the driver through the NVIDIA runtime). CUDA
# 12.2's NVIDIA_REQUIRE_CUDA is met by drivers from 535 on.
CUDA_IMAGE = "nvidia/cuda:12.2.2-base-ubuntu22.04"
COMMAND = ("nvidia-smi", "-L")
# SkyPilot 0.14 looks for exactly this name (provision/kubernetes/utils.py
# check_nvidia_runtime_class), and sets it on a GPU pod when the cluster has it.
RUNTIME_CLASS = NVIDIA_RUNTIME_CLASS
# After this many seconds past its wait the kubelet stops the pod by itself
# (`activeDeadlineSeconds`): a pod whose doctor run was killed holds no GPU for long.
DEADLINE_MARGIN_S = 60

# A container waiting for one of these will not start by waiting longer.
STUCK_WAITING = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "CrashLoopBackOff",
    }
)
# Events that say the same of the pod's sandbox or volumes: (reason, words in the message).
STUCK_EVENTS = (
    ("FailedCreatePodSandBox", "no runtime for"),  # containerd without the nvidia handler
    ("FailedCreatePodSandBox", "RuntimeHandler"),  # CRI-O's words for it
    ("FailedMount", "hostPath type check failed"),  # a storage root that is not there
)


def pod_name(suffix: str) -> str:
    return f"{POD_PREFIX}{suffix}"


def has_runtime_class(listing: Any) -> bool:
    """Does `kubectl get runtimeclasses -o json` list one named `nvidia`? (SkyPilot's test.)"""
    items = listing.get("items") if isinstance(listing, dict) else None
    return any(
        isinstance(i, dict) and (i.get("metadata") or {}).get("name") == RUNTIME_CLASS
        for i in items or []
    )


def allocatable_gpus(nodes: Any) -> int:
    """`nvidia.com/gpu` allocatable over the nodes of `kubectl get nodes -o json`."""
    total = 0
    for node in (nodes.get("items") if isinstance(nodes, dict) else None) or []:
        value = ((node.get("status") or {}).get("allocatable") or {}).get(GPU_RESOURCE, 0)
        with contextlib.suppress(TypeError, ValueError):
            total += int(value)
    return total


def leftovers(listing: Any, now: float) -> list[str]:
    """The doctor GPU pods in `kubectl get pods -l SELECTOR -o json` whose own run must be over:
    older than their `activeDeadlineSeconds` plus a minute (another doctor's pod still running
    is left alone)."""
    out = []
    for pod in (listing.get("items") if isinstance(listing, dict) else None) or []:
        meta = pod.get("metadata") or {}
        deadline = (pod.get("spec") or {}).get("activeDeadlineSeconds")
        try:
            stamp = str(meta.get("creationTimestamp")).replace("Z", "+00:00")  # 3.10 reads no Z
            created = datetime.fromisoformat(stamp).timestamp()
        except ValueError:
            created = 0.0  # unreadable: old enough
        limit = deadline if isinstance(deadline, int) else 0
        if meta.get("name") and now - created > limit + DEADLINE_MARGIN_S:
            out.append(str(meta["name"]))
    return out


def shaped_task(config: HostConfig, name: str) -> dict[str, Any]:
    """The task the house rules make of a 1-GPU batch job named after the pod."""
    resources: dict[str, Any] = {"infra": config.infra}
    model = next(iter(config.gpus), None)
    if model:
        resources["accelerators"] = {model: 1}
    return apply_house_rules({"name": name, "resources": resources}, config, DOCTOR_USER, BATCH)


def pod_config_of(task: dict[str, Any]) -> dict[str, Any] | None:
    """The shaped task's `pod_config` (under `kubernetes`, or `ssh` for an SSH node pool)."""
    cfg = task.get("config") or {}
    for section in ("ssh", "kubernetes"):
        pod_config = (cfg.get(section) or {}).get("pod_config")
        if isinstance(pod_config, dict):
            return pod_config
    return None


def pod_manifest(
    config: HostConfig, name: str, *, runtime_class: bool, wait_s: float
) -> dict[str, Any] | None:
    """The pod doctor creates, or None where the house rules give no pod_config (an infra
    that is not the box's Kubernetes)."""
    task = shaped_task(config, name)
    pod_config = pod_config_of(task)
    if pod_config is None:
        return None
    pod = bare_pod(task, name, wait_s)
    merge_pod_config(pod, copy.deepcopy(pod_config))
    spec = pod["spec"]
    # SkyPilot's _configure_runtime_class: an empty value switches it off, else `nvidia` on a
    # GPU pod when the cluster has that RuntimeClass.
    if "runtimeClassName" in spec and not spec["runtimeClassName"]:
        del spec["runtimeClassName"]
    elif runtime_class and "runtimeClassName" not in spec:
        spec["runtimeClassName"] = RUNTIME_CLASS
    return pod


def bare_pod(task: dict[str, Any], name: str, wait_s: float) -> dict[str, Any]:
    """The pod before its pod_config: the shaped task's labels, image and identity, one
    container with 1 GPU that runs `COMMAND`, never restarted, stopped past its deadline."""
    res = task["resources"]
    image_id = str(res.get("image_id") or "")
    image = image_id.removeprefix("docker:") if image_id.startswith("docker:") else CUDA_IMAGE
    # SkyPilot runs the pod as `remote_identity` when it names a service account.
    account = ((task.get("config") or {}).get("kubernetes") or {}).get("remote_identity")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": JOBS_NAMESPACE,
            "labels": {**res.get("labels", {}), DOCTOR_LABEL: DOCTOR_LABEL_VALUE},
        },
        "spec": {
            "serviceAccountName": account,
            "restartPolicy": "Never",
            "activeDeadlineSeconds": int(wait_s) + DEADLINE_MARGIN_S,
            "containers": [
                {
                    "name": MAIN_CONTAINER,
                    "image": image,
                    "command": list(COMMAND),
                    "resources": {"limits": {GPU_RESOURCE: 1}},
                }
            ],
        },
    }


# The list fields SkyPilot merges item by item (sky/utils/config_utils.py _PATCH_MERGE_KEYS
# for the fields a pod_config of the house rules can hold), by this key.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
    "ports": "containerPort",
    "tolerations": None,  # SkyPilot appends them
}


def merge_pod_config(base: dict[str, Any], override: dict[str, Any]) -> None:
    """`override` merged into `base` the way SkyPilot 0.14 merges a pod_config into its pod
    (`merge_k8s_configs`): mappings recursively, keyed lists item by item (a container
    without a name into the first one), other lists appended, anything else replaced."""
    for key, value in override.items():
        mine = base.get(key)
        if isinstance(value, dict) and isinstance(mine, dict):
            merge_pod_config(mine, value)
        elif isinstance(value, list) and isinstance(mine, list):
            merge_key = _MERGE_KEYS.get(key)
            for item in value:
                named = item.get(merge_key) if merge_key and isinstance(item, dict) else None
                same = next(
                    (m for m in mine if isinstance(m, dict) and m.get(merge_key) == named), None
                )
                if named is not None and same is not None:
                    merge_pod_config(same, item)
                elif named is None and key == "containers" and mine and isinstance(item, dict):
                    merge_pod_config(mine[0], item)
                else:
                    mine.append(item)
        else:
            base[key] = value


@dataclass(frozen=True)
class PodState:
    """What `kubectl get pod -o json` says of the pod, as doctor reads it."""

    phase: str  # Pending, Running, Succeeded, Failed, Unknown ("?" when not said)
    node: str | None = None
    reason: str | None = None  # status.reason, e.g. DeadlineExceeded
    unschedulable: str | None = None  # the PodScheduled=False condition's message
    waiting: tuple[str, str] | None = None  # the container's waiting reason and message
    exit_code: int | None = None  # once the container terminated
    terminated: tuple[str, str] | None = None  # its terminated reason and message

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed") or self.exit_code is not None

    @property
    def stuck(self) -> str | None:
        """Why waiting longer will not help (None: it may still run)."""
        if self.unschedulable is not None:
            return f"unschedulable: {self.unschedulable}"
        if self.waiting is not None and self.waiting[0] in STUCK_WAITING:
            reason, message = self.waiting
            return f"{reason}: {message}" if message else reason
        return None


def read_pod(doc: Any) -> PodState:
    if not isinstance(doc, dict):
        return PodState(phase="?")
    status = doc.get("status") or {}
    state = PodState(
        phase=str(status.get("phase") or "?"),
        node=(doc.get("spec") or {}).get("nodeName"),
        reason=status.get("reason"),
    )
    for cond in status.get("conditions") or []:
        if (
            isinstance(cond, dict)
            and cond.get("type") == "PodScheduled"
            and str(cond.get("status")) == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            state = replace(state, unschedulable=str(cond.get("message") or "Unschedulable"))
    containers = status.get("containerStatuses") or []
    first = containers[0] if containers and isinstance(containers[0], dict) else {}
    current = first.get("state") or {}
    if isinstance(current.get("waiting"), dict):
        waiting = current["waiting"]
        state = replace(
            state, waiting=(str(waiting.get("reason") or "?"), str(waiting.get("message") or ""))
        )
    if isinstance(current.get("terminated"), dict):
        done = current["terminated"]
        code = done.get("exitCode")
        state = replace(
            state,
            exit_code=code if isinstance(code, int) else -1,
            terminated=(str(done.get("reason") or "?"), str(done.get("message") or "")),
        )
    return state


@dataclass(frozen=True)
class Event:
    type: str  # Normal, Warning
    reason: str
    message: str


def read_events(doc: Any) -> list[Event]:
    """`kubectl get events -o json` for the pod, oldest first, as the API lists them."""
    items = doc.get("items") if isinstance(doc, dict) else None
    out = []
    for item in items or []:
        if isinstance(item, dict):
            out.append(
                Event(
                    str(item.get("type") or ""),
                    str(item.get("reason") or ""),
                    str(item.get("message") or "").strip(),
                )
            )
    return out


def stuck_event(events: list[Event]) -> Event | None:
    """The first event that says the pod will not start by waiting (`STUCK_EVENTS`)."""
    for event in events:
        for reason, words in STUCK_EVENTS:
            if event.reason == reason and words in event.message:
                return event
    return None


_LISTED_GPU = re.compile(r"^GPU (\d+): (?P<name>.+) \(UUID: (?P<uuid>GPU-[^)]+)\)$")


def seen_gpus(logs: str) -> list[tuple[str, str]]:
    """`(name, uuid)` per GPU line of `nvidia-smi -L` (`GPU 0: NVIDIA RTX A6000 (UUID:
    GPU-...)`); its MIG lines and anything else (an error it printed) are not GPUs."""
    out = []
    for line in logs.splitlines():
        found = _LISTED_GPU.match(line.strip())
        if found:
            out.append((found.group("name"), found.group("uuid")))
    return out
