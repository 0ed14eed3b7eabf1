"""k3s / Kubernetes: a context, Ready nodes, allocatable GPUs, the device plugin, and what the
cluster enforces by itself (the jobs' identity, the admission policies)."""

from __future__ import annotations

from typing import Any

from deskgpu.config import HostConfig
from deskgpu.config.doctor import Settings
from deskgpu.doctor.checks.base import (
    FAIL,
    OK,
    SKIP,
    WARN,
    Check,
    _Component,
    _json,
    _plural,
)
from deskgpu.doctor.facts import (
    HostFacts,
)
from deskgpu.kubenames import (
    ACCELERATOR_LABEL,
    JOB_SERVICE_ACCOUNT,
    JOBS_NAMESPACE,
    POLICIES,
    accelerator_label_value,
)

DOC_K8S_GPU = "https://docs.skypilot.co/en/latest/reference/kubernetes/kubernetes-setup.html"

_k8s = _Component("kubernetes")
GPU_RESOURCE = "nvidia.com/gpu"
GPU_LABELS = (
    "nvidia.com/gpu.product",
    ACCELERATOR_LABEL,
    "cloud.google.com/gke-accelerator",
)


def check_kubernetes(facts: HostFacts, config: HostConfig, s: Settings) -> list[Check]:
    context = facts.command("kube_context")
    names = (
        "nodes",
        "gpu_allocatable",
        "device_plugin",
        "gpu_labels",
        "job_identity",
        "admission",
    )
    if context is None or context.missing:
        return [
            _k8s(
                "context",
                FAIL,
                "neither `kubectl` nor `k3s` found: no Kubernetes on this host",
                "install k3s: `curl -sfL https://get.k3s.io | sh -` then set up GPUs: "
                + DOC_K8S_GPU,
            ),
            *(_k8s(n, SKIP, "no Kubernetes context") for n in names),
        ]
    if not context.ok:
        text = (context.stderr + context.stdout).lower()
        if "permission denied" in text:
            first = _k8s(
                "context",
                SKIP,
                f"cannot read the kubeconfig as {facts.user or 'this user'}: "
                f"{context.first_error_line()} (rerun as root: `sudo deskgpu doctor`)",
            )
        else:
            first = _k8s(
                "context",
                FAIL,
                f"no usable kube context: {context.first_error_line()}",
                "start k3s (`sudo systemctl enable --now k3s`) and point kubectl at it: "
                "`export KUBECONFIG=/etc/rancher/k3s/k3s.yaml`",
            )
        return [first, *(_k8s(n, SKIP, "no Kubernetes context") for n in names)]
    current = context.stdout.strip()
    out = [_check_context_name(current, config)]
    nodes_cmd = facts.command("kube_nodes")
    nodes_doc = _json(nodes_cmd.stdout) if nodes_cmd and nodes_cmd.ok else None
    if nodes_cmd is None:
        return [*out, *(_k8s(n, SKIP, "nodes were not listed") for n in names)]
    if not isinstance(nodes_doc, dict):
        why = nodes_cmd.first_error_line()
        hung = nodes_cmd.timed_out
        out.append(
            _k8s(
                "nodes",
                FAIL,
                f"the kube API did not answer: {why}" if hung else f"cannot list nodes: {why}",
                "`sudo systemctl status k3s` / `sudo journalctl -u k3s -n 50`",
            )
        )
        return [*out, *(_k8s(n, SKIP, "nodes were not listed") for n in names[1:])]
    nodes = nodes_doc.get("items") or []
    out.append(_check_nodes(nodes))
    # A cluster's nodes together have what `nodes:` gives them; one box what NVML sees here.
    local = len(facts.nvml.gpus) if facts.nvml.available else config.gpu_count
    physical = config.gpu_count if config.nodes else local
    allocatable = _check_allocatable(nodes, physical)
    out.append(allocatable)
    out.append(_check_device_plugin(facts, allocatable.status == OK))
    out.append(_check_gpu_labels(nodes, facts, config))
    out.append(_check_job_identity(facts))
    out.append(_check_admission(facts))
    return out


def _check_context_name(current: str, config: HostConfig) -> Check:
    wanted = (
        config.infra.split("/", 1)[1] if config.infra.startswith(("k8s/", "kubernetes/")) else None
    )
    if wanted and wanted != current:
        return _k8s(
            "context",
            WARN,
            f"kubectl's current context is {current!r}; the host config's infra uses {wanted!r}",
            f"`kubectl config use-context {wanted}`",
        )
    return _k8s("context", OK, f"current context {current!r}")


def _node_ready(node: dict[str, Any]) -> bool:
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return str(cond.get("status")) == "True"
    return False


def _node_name(node: dict[str, Any]) -> str:
    return str((node.get("metadata") or {}).get("name", "?"))


def _check_nodes(nodes: list[dict[str, Any]]) -> Check:
    if not nodes:
        return _k8s("nodes", FAIL, "the cluster has no nodes", "`sudo systemctl restart k3s`")
    not_ready = [_node_name(n) for n in nodes if not _node_ready(n)]
    if not_ready:
        return _k8s(
            "nodes",
            FAIL,
            f"node {', '.join(not_ready)} not Ready",
            f"`kubectl describe node {not_ready[0]}` and `sudo journalctl -u k3s -n 50`",
        )
    first = nodes[0]
    version = ((first.get("status") or {}).get("nodeInfo") or {}).get("kubeletVersion", "?")
    return _k8s(
        "nodes", OK, f"{_plural(len(nodes), 'node')} Ready ({_node_name(first)}, {version})"
    )


def _gpu_count(node: dict[str, Any], key: str) -> int:
    value = ((node.get("status") or {}).get(key) or {}).get(GPU_RESOURCE, 0)
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _check_allocatable(nodes: list[dict[str, Any]], physical: int) -> Check:
    per_node = {_node_name(n): _gpu_count(n, "allocatable") for n in nodes}
    total = sum(per_node.values())
    shown = ", ".join(f"{name}: {n}" for name, n in per_node.items())
    fix = (
        "install the NVIDIA device plugin (k3s picks up the nvidia runtime once the container "
        f"toolkit is installed: `sudo systemctl restart k3s`); see {DOC_K8S_GPU}"
    )
    if total == 0:
        return _k8s(
            "gpu_allocatable",
            FAIL,
            f"no node advertises {GPU_RESOURCE} ({shown}): SkyPilot cannot place GPU jobs",
            fix,
        )
    if physical and total != physical:
        return _k8s(
            "gpu_allocatable",
            FAIL,
            f"nodes advertise {total} {GPU_RESOURCE} ({shown}); the box has {physical} GPUs",
            "restart the device plugin pods (`kubectl -n kube-system rollout restart ds "
            "nvidia-device-plugin-daemonset`) and check `nvidia-smi -L`",
        )
    return _k8s("gpu_allocatable", OK, f"{GPU_RESOURCE} allocatable: {shown}")


def _check_device_plugin(facts: HostFacts, allocatable_ok: bool) -> Check:
    cmd = facts.command("kube_daemonsets")
    doc = _json(cmd.stdout) if cmd and cmd.ok else None
    if not isinstance(doc, dict):
        why = cmd.first_error_line() if cmd else "daemonsets were not listed"
        return _k8s("device_plugin", SKIP, f"cannot list daemonsets: {why}")
    plugins = []
    for ds in doc.get("items") or []:
        meta = ds.get("metadata") or {}
        name = str(meta.get("name", ""))
        if "nvidia-device-plugin" not in name:
            continue
        status = ds.get("status") or {}
        plugins.append(
            (
                f"{meta.get('namespace', '?')}/{name}",
                int(status.get("numberReady", 0)),
                int(status.get("desiredNumberScheduled", 0)),
            )
        )
    if not plugins:
        return _k8s(
            "device_plugin",
            WARN if allocatable_ok else FAIL,
            "no nvidia-device-plugin daemonset (device plugin or GPU operator) found",
            f"install the NVIDIA device plugin or GPU operator: {DOC_K8S_GPU}",
        )
    bad = [p for p in plugins if p[1] < max(1, p[2])]
    shown = ", ".join(f"{n} {r}/{d} ready" for n, r, d in plugins)
    if bad:
        ns, _, name = bad[0][0].partition("/")
        return _k8s(
            "device_plugin",
            FAIL,
            shown,
            f"`kubectl -n {ns} describe ds {name}` and `kubectl -n {ns} logs ds/{name}`",
        )
    return _k8s("device_plugin", OK, shown)


def _check_gpu_labels(nodes: list[dict[str, Any]], facts: HostFacts, config: HostConfig) -> Check:
    gpu_nodes = [n for n in nodes if _gpu_count(n, "allocatable") > 0] or nodes
    found: list[tuple[str, list[str]]] = []
    missing: list[tuple[str, list[str]]] = []
    for node in gpu_nodes:
        labels = (node.get("metadata") or {}).get("labels") or {}
        have = [f"{k}={labels[k]}" for k in GPU_LABELS if k in labels]
        (found if have else missing).append((_node_name(node), have))
    if missing:
        model = next(iter(config.gpus), None) or "<gpu-type>"
        first = missing[0][0]
        return _k8s(
            "gpu_labels",
            WARN,
            f"node {', '.join(n for n, _ in missing)} has no GPU product label: SkyPilot "
            "cannot match `accelerators: TYPE:N` to it",
            f"`kubectl label node {first} {ACCELERATOR_LABEL}={accelerator_label_value(model)}` "
            "(the rendered install.sh does it; or deploy NVIDIA GPU Feature Discovery)",
        )
    return _k8s("gpu_labels", OK, "; ".join(f"{n}: {', '.join(h)}" for n, h in found))


_RENDERED = "the rendered install.sh (`sudo sh <out>/install.sh`)"
_JOB_SA = f"{JOBS_NAMESPACE}/{JOB_SERVICE_ACCOUNT}"


def _check_job_identity(facts: HostFacts) -> Check:
    """The jobs' service account exists and may not create pods (issue #12)."""
    account = facts.command("kube_job_account")
    can_i = facts.command("kube_job_can_create_pods")
    if account is None or can_i is None:
        return _k8s("job_identity", SKIP, "the jobs' service account was not looked up")
    apply = f"rerun {_RENDERED}, or `kubectl apply -f <out>/kube/deskgpu-job.yaml`"
    if not account.ok:
        if "notfound" in (account.stderr + account.stdout).lower().replace(" ", ""):
            return _k8s(
                "job_identity",
                FAIL,
                f"service account {_JOB_SA} does not exist: SkyPilot cannot start a job's pod "
                "as it",
                apply,
            )
        return _k8s(
            "job_identity",
            SKIP,
            f"cannot read service account {_JOB_SA}: {account.first_error_line()}",
        )
    answer = (can_i.stdout.split() or [""])[0].lower()
    if answer == "yes":
        return _k8s(
            "job_identity",
            FAIL,
            f"{_JOB_SA} may create pods: a job's code could start a privileged or hostPath pod "
            "of its own",
            f"{apply}; find what else grants it: `kubectl get rolebindings,clusterrolebindings "
            f"-A -o wide | grep {JOB_SERVICE_ACCOUNT}`",
        )
    if answer != "no":
        return _k8s(
            "job_identity",
            SKIP,
            f"cannot ask the API what {_JOB_SA} may do: {can_i.first_error_line()} (rerun as "
            "root: `sudo deskgpu doctor`)",
        )
    return _k8s("job_identity", OK, f"{_JOB_SA} exists and may not create pods")


def _check_admission(facts: HostFacts) -> Check:
    """deskgpu's ValidatingAdmissionPolicies and their Deny bindings are in place."""
    cmd = facts.command("kube_admission")
    if cmd is None:
        return _k8s("admission", SKIP, "admission policies were not listed")
    apply = f"rerun {_RENDERED}, or `kubectl apply -f <out>/kube/deskgpu-admission.yaml`"
    doc = _json(cmd.stdout) if cmd.ok else None
    if not isinstance(doc, dict):
        why = cmd.first_error_line()
        if "doesn't have a resource type" in why:
            return _k8s(
                "admission",
                FAIL,
                f"this Kubernetes serves no ValidatingAdmissionPolicy ({why}): nothing stops "
                "a pod the house rules never saw",
                "upgrade k3s to Kubernetes 1.30 or later, then " + apply,
            )
        return _k8s("admission", SKIP, f"cannot list admission policies: {why}")
    policies: set[str] = set()
    denying: set[str] = set()
    for item in doc.get("items") or []:
        kind = item.get("kind")
        name = str((item.get("metadata") or {}).get("name", ""))
        spec = item.get("spec") or {}
        if kind == "ValidatingAdmissionPolicy":
            policies.add(name)
        elif kind == "ValidatingAdmissionPolicyBinding" and "Deny" in (
            spec.get("validationActions") or []
        ):
            denying.add(str(spec.get("policyName", "")))
    missing = [f"policy {p}" for p in POLICIES if p not in policies]
    missing += [f"a Deny binding of {p}" for p in POLICIES if p not in denying]
    if missing:
        return _k8s(
            "admission",
            FAIL,
            f"missing {', '.join(missing)}: pods in namespace {JOBS_NAMESPACE} are not "
            "checked by the cluster",
            apply,
        )
    return _k8s("admission", OK, f"{', '.join(POLICIES)} bound with Deny")
