"""`kubernetes.gpu_pod`: a 1-GPU pod, started the way a job's pod starts, ran `nvidia-smi` and
saw one GPU of the inventory's model (`deskgpu doctor --gpu-pod`; without it, a skip that says
how to run it). The pod and how it was read: `deskgpu.doctor.gpupod`."""

from __future__ import annotations

from deskgpu.config import HostConfig
from deskgpu.config.doctor import Settings
from deskgpu.doctor import gpupod
from deskgpu.doctor.checks.base import FAIL, OK, SKIP, WARN, Check, _Component, _config_file, _json
from deskgpu.doctor.checks.driver import gpu_matches
from deskgpu.doctor.facts import GpuPodFact, HostFacts

_k8s = _Component("kubernetes")
RUN_IT = "`sudo deskgpu doctor --gpu-pod`"
CONTAINERD_CONFIG = "/var/lib/rancher/k3s/agent/etc/containerd/config.toml"
RUNTIME_FIX = (
    "the NVIDIA runtime does not reach pods: check the NVIDIA Container Toolkit (`docker.toolkit`"
    f" above) and k3s's containerd runtimes (`sudo grep -n nvidia {CONTAINERD_CONFIG}`; k3s adds "
    "the `nvidia` runtime when it finds nvidia-container-runtime at start: `sudo systemctl "
    f"restart k3s`), then rerun {RUN_IT}"
)
NO_RUNTIME_CLASS_FIX = (
    f"the cluster has no RuntimeClass `{gpupod.RUNTIME_CLASS}`, so GPU pods run with the default "
    "runtime: rerun the rendered install.sh (it applies `kube/nvidia-runtimeclass.yaml` when "
    "k3s made none; k3s makes one when it finds nvidia-container-runtime at start), then rerun "
    + RUN_IT
)


def check_gpu_pod(facts: HostFacts, config: HostConfig, s: Settings) -> list[Check]:
    fact = facts.gpu_pod
    if fact is None:
        return [
            _k8s(
                "gpu_pod",
                SKIP,
                "not run: it starts a 1-GPU pod shaped like a job's and waits for `nvidia-smi` "
                f"in it; run {RUN_IT}",
            )
        ]
    if fact.not_started is not None:
        if not config.on_box:
            return [_k8s("gpu_pod", SKIP, f"no GPU pod was started: {fact.not_started}")]
        return [
            _k8s(
                "gpu_pod",
                FAIL,
                f"no GPU pod was started: {fact.not_started}",
                f"fix the checks above, then rerun {RUN_IT}",
            )
        ]
    return [_with_cleanup(_verdict(fact, config), fact)]


def _verdict(fact: GpuPodFact, config: HostConfig) -> Check:
    where = f"pod {fact.namespace}/{fact.pod}"
    create = fact.commands.get("create")
    if create is None or not create.ok:
        why = create.first_error_line() if create else "it was not sent"
        return _k8s("gpu_pod", FAIL, f"the API refused {where}: {why}", _refused_fix(why))
    if fact.interrupted:
        return _k8s(
            "gpu_pod",
            FAIL,
            f"interrupted by {fact.interrupted} {fact.waited_s:.0f} s after {where} was "
            "created, before it finished: nothing was proven",
            f"rerun {RUN_IT}",
        )
    got = fact.commands.get("pod")
    state = gpupod.read_pod(_json(got.stdout) if got and got.ok else None)
    events = _events(fact)
    if state.phase == "?":
        why = got.first_error_line() if got else "it was never looked at"
        return _k8s(
            "gpu_pod",
            FAIL,
            f"{where} could not be read back: {why}",
            f"rerun {RUN_IT}; `kubectl get events -n {fact.namespace}` may say what removed it",
        )
    if state.finished:
        return _finished(fact, state, config)
    stuck = state.stuck
    if stuck is not None:
        return _stuck(fact, state, stuck, config)
    event = gpupod.stuck_event(events)
    if event is not None:
        return _stuck_event(fact, event)
    return _still_waiting(fact, state, events)


def _image(fact: GpuPodFact) -> str:
    containers = ((fact.manifest or {}).get("spec") or {}).get("containers") or [{}]
    return str(containers[0].get("image") or "?")


def _runtime_class(fact: GpuPodFact) -> str | None:
    return ((fact.manifest or {}).get("spec") or {}).get("runtimeClassName")


def _events(fact: GpuPodFact) -> list[gpupod.Event]:
    got = fact.commands.get("events")
    return gpupod.read_events(_json(got.stdout) if got and got.ok else None)


def _logs(fact: GpuPodFact) -> str:
    got = fact.commands.get("logs")
    return got.stdout if got and got.ok else ""


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")[:300]


def _refused_fix(why: str) -> str:
    low = why.lower()
    if "serviceaccount" in low or "service account" in low:
        return (
            "the jobs' service account is missing: rerun the rendered install.sh, or `kubectl "
            "apply -f <out>/kube/deskgpu-job.yaml` (`kubernetes.job_identity` above)"
        )
    if "admission" in low or "denied the request" in low:
        return (
            "the cluster's admission policy and the house rules disagree about a job's pod: "
            "render and apply the box's files again with the same host config "
            "(`kube/deskgpu-admission.yaml`), then rerun " + RUN_IT
        )
    if "runtimeclass" in low:
        return NO_RUNTIME_CLASS_FIX
    return f"what the API said above; then rerun {RUN_IT}"


def _finished(fact: GpuPodFact, state: gpupod.PodState, config: HostConfig) -> Check:
    where = f"pod {fact.namespace}/{fact.pod}"
    logs = _logs(fact)
    if state.reason == "DeadlineExceeded":
        return _k8s(
            "gpu_pod",
            FAIL,
            f"the kubelet stopped {where} at its deadline ({state.phase}) before nvidia-smi "
            "finished",
            f"rerun {RUN_IT}; a pod that cannot finish `nvidia-smi` in minutes points at the "
            "driver: `sudo dmesg | grep -i xid`",
        )
    if state.exit_code == 0 or (state.exit_code is None and state.phase == "Succeeded"):
        gpus = gpupod.seen_gpus(logs)
        if not gpus:
            said = _first_line(logs) or "no output"
            return _k8s(
                "gpu_pod",
                FAIL,
                f"nvidia-smi in {where} exited 0 but listed no GPU ({said})",
                RUNTIME_FIX,
            )
        return _seen(fact, state, gpus, config)
    reason, message = state.terminated or ("?", "")
    said = _first_line(logs) or _first_line(message) or reason
    code = f"exit {state.exit_code}" if state.exit_code is not None else state.phase
    if "executable file not found" in message or "no such file" in message.lower():
        return _k8s(
            "gpu_pod",
            FAIL,
            f"no nvidia-smi in {where} ({reason}: {_first_line(message)}): the NVIDIA runtime "
            "did not give the container the driver's tools",
            RUNTIME_FIX if _runtime_class(fact) else NO_RUNTIME_CLASS_FIX,
        )
    return _k8s(
        "gpu_pod",
        FAIL,
        f"nvidia-smi failed in {where} ({code}): {said}",
        RUNTIME_FIX if _runtime_class(fact) else NO_RUNTIME_CLASS_FIX,
    )


def _seen(
    fact: GpuPodFact,
    state: gpupod.PodState,
    gpus: list[tuple[str, str]],
    config: HostConfig,
) -> Check:
    where = f"pod {fact.namespace}/{fact.pod}"
    shown = ", ".join(f"{name} ({uuid})" for name, uuid in gpus)
    if len(gpus) != 1:
        return _k8s(
            "gpu_pod",
            FAIL,
            f"{where} was given 1 GPU and nvidia-smi in it saw {len(gpus)}: {shown}: a job "
            "can use GPUs the scheduler gave to others",
            "make the device plugin's allocation the only way in: NVIDIA k8s-device-plugin's "
            "`deviceListStrategy`, and `accept-nvidia-visible-devices-envvar-when-unprivileged "
            "= false` in /etc/nvidia-container-runtime/config.toml; then rerun " + RUN_IT,
        )
    name, _ = gpus[0]
    how = f"runtimeClassName {_runtime_class(fact)}" if _runtime_class(fact) else "no runtime class"
    account = ((fact.manifest or {}).get("spec") or {}).get("serviceAccountName")
    ran = (
        f"{where} (service account {account}, {how}, image {_image(fact)}) on node "
        f"{state.node or '?'} saw {shown} in {fact.waited_s:.0f} s"
    )
    if not config.gpus:
        return _k8s(
            "gpu_pod",
            WARN,
            f"{ran}; no `gpus:` inventory in the host config to compare it with",
            f"add the box's GPUs to {_config_file(config)}, e.g. `gpus: {{A6000: 4}}`",
        )
    models = [model for model in config.gpus if gpu_matches(model, name)]
    if not models:
        return _k8s(
            "gpu_pod",
            FAIL,
            f"{ran}: not a GPU of the inventory ({config.describe_gpus()})",
            f"fix `gpus:` in {_config_file(config)}, or find the node that gave the pod "
            "another GPU (`kubectl get nodes -o wide`)",
        )
    return _k8s("gpu_pod", OK, f"{ran}: one of the inventory's {models[0]}")


def _stuck(fact: GpuPodFact, state: gpupod.PodState, stuck: str, config: HostConfig) -> Check:
    where = f"pod {fact.namespace}/{fact.pod}"
    if state.unschedulable is not None:
        message = state.unschedulable
        if f"Insufficient {gpupod.GPU_RESOURCE}" in message:
            fix = (
                "every GPU is held by another pod (`deskgpu queue`; rerun when one is free), or "
                "the device plugin advertises fewer than the box has (`kubectl describe node`, "
                "`kubernetes.gpu_allocatable` above)"
            )
        else:
            fix = f"what the scheduler names: `kubectl describe node`; then rerun {RUN_IT}"
        return _k8s("gpu_pod", FAIL, f"{where} is unschedulable: {message}", fix)
    reason = state.waiting[0] if state.waiting else ""
    if "Image" in reason:
        image = _image(fact)
        return _k8s(
            "gpu_pod",
            FAIL,
            f"{where} cannot get its image {image}: {stuck}",
            f"check the image name (the host config's default_image in {_config_file(config)}, "
            f"else {gpupod.CUDA_IMAGE}) and that the box reaches its registry: `sudo k3s crictl "
            f"pull {image}`",
        )
    return _k8s(
        "gpu_pod",
        FAIL,
        f"{where} cannot start its container: {stuck}",
        f"fix what it names, then rerun {RUN_IT}",
    )


def _stuck_event(fact: GpuPodFact, event: gpupod.Event) -> Check:
    where = f"pod {fact.namespace}/{fact.pod}"
    detail = f"{where} cannot start: {event.reason}: {event.message}"
    if event.reason == "FailedMount":
        return _k8s(
            "gpu_pod",
            FAIL,
            detail,
            "create the storage roots every job mounts (the `storage.*` checks say how), then "
            f"rerun {RUN_IT}",
        )
    return _k8s("gpu_pod", FAIL, detail, RUNTIME_FIX)


def _still_waiting(fact: GpuPodFact, state: gpupod.PodState, events: list[gpupod.Event]) -> Check:
    where = f"pod {fact.namespace}/{fact.pod}"
    doing = state.phase + (f" ({state.waiting[0]})" if state.waiting else "")
    pulled = {e.reason for e in events} & {"Pulled", "Started", "Created"}
    if fact.timed_out and any(e.reason == "Pulling" for e in events) and not pulled:
        image = _image(fact)
        return _k8s(
            "gpu_pod",
            FAIL,
            f"{where} was still pulling its image {image} after {fact.wait_s:.0f} s",
            f"pull it ahead (`sudo k3s crictl pull {image}`), or wait longer: `sudo deskgpu "
            "doctor --gpu-pod --gpu-pod-timeout 900`",
        )
    warnings = [e for e in events if e.type == "Warning"]
    last = f"; the last warning: {warnings[-1].reason}: {warnings[-1].message}" if warnings else ""
    if fact.timed_out:
        return _k8s(
            "gpu_pod",
            FAIL,
            f"{where} was still {doing} after {fact.wait_s:.0f} s{last}",
            "what the warning names; a slow start: `sudo deskgpu doctor --gpu-pod "
            "--gpu-pod-timeout 900`",
        )
    return _k8s(
        "gpu_pod",
        FAIL,
        f"{where} went away while {doing}{last}",
        f"rerun {RUN_IT}; `kubectl get events -n {fact.namespace}` may say what removed it",
    )


def _with_cleanup(check: Check, fact: GpuPodFact) -> Check:
    """The verdict, with what became of the pod (and of those earlier runs left)."""
    detail, status, fix = check.detail, check.status, check.fix
    left = fact.commands.get("delete_leftovers")
    if left is not None:
        names = [a for a in left.argv if a.startswith(gpupod.POD_PREFIX)]
        done = "deleted" if left.ok else f"could not delete ({left.first_error_line()})"
        detail += f"; {done} {len(names)} pod(s) an earlier run left: {', '.join(names)}"
    delete = fact.commands.get("delete")
    if delete is not None and delete.ok:
        return Check(check.id, check.component, status, detail, fix)
    why = delete.first_error_line() if delete is not None else "no delete was sent"
    detail += f"; the pod could not be deleted: {why}"
    by_hand = f"`kubectl delete pod -n {fact.namespace} -l {gpupod.SELECTOR}`"
    if status == OK:
        status, fix = WARN, by_hand
    else:
        fix = f"{fix}; and {by_hand}"
    return Check(check.id, check.component, status, detail, fix)
