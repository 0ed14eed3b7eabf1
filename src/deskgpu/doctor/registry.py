"""Every doctor check, declared once: its id, component, what it needs, and its docs row.

The runner (`deskgpu.doctor.checks.run_checks`) walks this table in order: a check whose
`needs` did not pass (fail or skip) is skipped, saying which, so skips cascade by
construction; the host config's `doctor.skip` may name only ids from here (else exit 2), and
docs/doctor.md's check table is generated from it (`python -m deskgpu.docs`, held equal
by a test). Imports nothing: the config loader reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Where a check runs: on a cluster (the host config's `nodes:`) each node runs its own; one
# box is its own server. Checks a node does not run are reported `skip`, saying where they
# run; a single box never reports the cluster's.
ANY = "any"  # every node
SERVER = "server"  # one box, or a cluster's server (the API server, k3s's admin, reap)
AGENT = "agent"  # a cluster's agents
CLUSTER = "cluster"  # every node of a cluster
CLUSTER_SERVER = "cluster-server"  # a cluster's server
LOCAL_ROOTS = "local-roots"  # a node whose roots are its own disks (not an NFS mount)
PLACES = {
    ANY: "every node",
    SERVER: "the server",
    AGENT: "agents",
    CLUSTER: "every node of a cluster",
    CLUSTER_SERVER: "a cluster's server",
    LOCAL_ROOTS: "a node with its own disks",
}
CLUSTER_ONLY = (AGENT, CLUSTER, CLUSTER_SERVER)


@dataclass(frozen=True)
class CheckSpec:
    id: str  # "component.name"
    needs: tuple[str, ...]  # checks that must be ok or warn for this one to mean anything
    when: str  # docs: when it fails (or warns)
    fix: str  # docs: the fix it gives
    on: str = ANY  # where it runs (PLACES)

    @property
    def component(self) -> str:
        return self.id.split(".", 1)[0]


def _spec(id: str, when: str, fix: str, needs: tuple[str, ...] = (), on: str = ANY) -> CheckSpec:
    return CheckSpec(id, needs, when, fix, on)


REGISTRY: tuple[CheckSpec, ...] = (
    _spec("driver.nvml", "NVML does not load (no driver)", "install the driver, reboot"),
    _spec(
        "driver.gpus",
        "GPU lost, or count/models differ from `gpus:` (warn: no inventory)",
        "`dmesg \\| grep -i xid`, reseat/reboot, or fix `gpus:`",
        ("driver.nvml",),
    ),
    _spec(
        "driver.persistence",
        "warn: persistence mode off",
        "`sudo systemctl enable --now nvidia-persistenced`",
        ("driver.nvml",),
    ),
    _spec(
        "driver.ecc",
        "uncorrectable ECC errors, row-remap failure (fail); pending retirement/remap, DBE "
        "retired pages (warn); ECC off only with `require_ecc`",
        "`sudo nvidia-smi -r -i <index>`, RMA doc",
        ("driver.nvml",),
    ),
    _spec(
        "driver.thermal",
        "thermal slowdown in every sample (fail); in some samples, HW slowdown throughout, or "
        "at/above `max_temperature_c` (warn)",
        "cooling/airflow",
        ("driver.nvml",),
    ),
    _spec("docker.cli", "`docker` not installed", "Docker Engine install doc"),
    _spec(
        "docker.daemon",
        "daemon down or hung (skip: socket permission)",
        "`sudo systemctl enable --now docker`",
        ("docker.cli",),
    ),
    _spec(
        "docker.nvidia_runtime",
        "no `nvidia` runtime and no NVIDIA CDI spec (`/etc/docker/daemon.json`, `/etc/cdi`, "
        "`/var/run/cdi`)",
        "`sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker`",
    ),
    _spec(
        "docker.toolkit",
        "`nvidia-ctk` missing (ok shows its version)",
        "NVIDIA Container Toolkit install doc",
    ),
    _spec(
        "kubernetes.context",
        "no kubectl/k3s, or no current context (warn: context differs from `infra: k8s/<ctx>`)",
        "install/start k3s, `export KUBECONFIG=/etc/rancher/k3s/k3s.yaml`",
        on=SERVER,
    ),
    _spec(
        "kubernetes.nodes",
        "API hung/unreachable, or a node not Ready",
        "`journalctl -u k3s`, `kubectl describe node`",
        ("kubernetes.context",),
        on=SERVER,
    ),
    _spec(
        "kubernetes.gpu_allocatable",
        "`nvidia.com/gpu` allocatable is 0 or differs from the physical GPU count",
        "install / restart the NVIDIA device plugin",
        ("kubernetes.nodes",),
        on=SERVER,
    ),
    _spec(
        "kubernetes.device_plugin",
        "no `nvidia-device-plugin` daemonset (device plugin or GPU operator), or not ready",
        "install it / `kubectl logs ds/...`",
        ("kubernetes.nodes",),
        on=SERVER,
    ),
    _spec(
        "kubernetes.gpu_labels",
        "warn: no `nvidia.com/gpu.product` / `skypilot.co/accelerator` label",
        "`kubectl label node <node> skypilot.co/accelerator=<type>`",
        ("kubernetes.nodes",),
        on=SERVER,
    ),
    _spec(
        "kubernetes.job_identity",
        "the jobs' service account (`default/deskgpu-job`) does not exist, or may create pods "
        "(`kubectl auth can-i create pods --as=system:serviceaccount:default:deskgpu-job`)",
        "rerun the rendered `install.sh` (`kube/deskgpu-job.yaml`); find other bindings of it",
        ("kubernetes.nodes",),
        on=SERVER,
    ),
    _spec(
        "kubernetes.admission",
        "a deskgpu ValidatingAdmissionPolicy (`deskgpu-job-pods`, `deskgpu-job-deletes`) or "
        "its Deny binding is missing, or the cluster serves none (Kubernetes < 1.30)",
        "rerun the rendered `install.sh` (`kube/deskgpu-admission.yaml`)",
        ("kubernetes.nodes",),
        on=SERVER,
    ),
    _spec(
        "kubernetes.gpu_pod",
        "only with `--gpu-pod` (else skip, saying how): one 1-GPU pod shaped like a job's (the "
        "house rules' pod_config and labels, the jobs' service account, `runtimeClassName: "
        "nvidia` when that RuntimeClass exists) is refused, unschedulable, cannot pull its "
        "image or start, its `nvidia-smi` fails or sees no GPU, another model than `gpus:` "
        "or more than 1 GPU, or it is not done within `--gpu-pod-timeout`; the pod is deleted "
        "on every way out",
        "what the pod's status or events name (a GPU to free, the image, the `nvidia` "
        "RuntimeClass or runtime, `gpus:`)",
        ("kubernetes.gpu_allocatable",),
        on=SERVER,
    ),
    _spec("skypilot.installed", "skypilot missing next to deskgpu", "reinstall deskgpu"),
    _spec(
        "skypilot.endpoint",
        "no endpoint configured (every user would auto-start a private server); warn: "
        "`SKYPILOT_API_SERVER_ENDPOINT` overrides the box's `api_server`",
        "the rendered `skypilot-api.service` + `api_server:` + `/etc/profile.d` export",
        on=SERVER,
    ),
    _spec(
        "skypilot.api_server",
        "`/api/health` does not answer (warn: not healthy, or client/server versions differ)",
        "start the rendered `skypilot-api.service`",
        on=SERVER,
    ),
    _spec(
        "skypilot.shared_server",
        "the server on the endpoint's port is a user's private one, or listens beyond "
        "loopback (`--host 0.0.0.0`: unauthenticated on every interface); warn: other private "
        "servers, or no `--deploy`",
        "`sky api stop` as that user; the rendered `skypilot-api.service` (127.0.0.1)",
        on=SERVER,
    ),
    _spec(
        "skypilot.infra",
        "`kubernetes` (or `ssh` for `ssh/<pool>`) not enabled on the server",
        "`sky check kubernetes` on the server",
        ("skypilot.api_server",),
        on=SERVER,
    ),
    _spec(
        "skypilot.admin_policy",
        "with `require_admin_policy`: the server config has no `admin_policy: deskgpu.…`",
        "add the deskgpu admin policy, restart the server",
        on=SERVER,
    ),
    _spec(
        "skypilot.hardening",
        "with `require_admin_policy`: the running server has no deskgpu guard (`GET "
        "/plugins/api/deskgpu/guard` is 404: clients can switch the policy off), or it pins "
        "another policy; warn: it enforces another host config than doctor read",
        "install the rendered `~/.sky/plugins.yaml`, restart the server",
        ("skypilot.api_server",),
        on=SERVER,
    ),
    _spec(
        "skypilot.kueue",
        "with `kueue_local_queue`: Kueue not installed or the LocalQueue missing",
        "install Kueue, create the LocalQueue",
        on=SERVER,
    ),
    _spec(
        "golden_rule.host_python",
        "warn: torch/tensorflow/jax/`nvidia-*` wheels in the system (or `~/.local`) "
        "site-packages, with what and where",
        "`sudo python3 -m pip uninstall -y …`",
    ),
    _spec(
        "golden_rule.cuda_toolkit",
        "warn: a CUDA toolkit under `/usr/local/cuda*` (and if newer than the driver supports)",
        "remove it; jobs get CUDA from their image",
    ),
    _spec(
        "golden_rule.conda",
        "warn: conda in shared paths (`/opt/conda`, `/opt/miniconda*`, …)",
        "remove it",
    ),
    _spec(
        "storage.data",
        "the data root is missing or not a directory; warn: researchers cannot read it",
        "`sudo install -d -o root -g root -m 0755 …`, `sudo chmod o+rx …`",
    ),
    _spec(
        "storage.checkpoints",
        "the checkpoint root is missing, or writable by anyone but root (a planted "
        "`ln -s / <root>/<user>` would hand that user's jobs the host)",
        "`sudo chown root:root … && sudo chmod 0755 …`",
    ),
    _spec(
        "storage.free_space",
        "free below `min_free_pct` (fail) / `warn_free_pct` (warn)",
        "`du` and prune",
    ),
    _spec(
        "storage.local_disk",
        "warn: a root on a network (nfs, cifs, sshfs…) or memory filesystem",
        "mount the local NVMe there",
        on=LOCAL_ROOTS,
    ),
    _spec(
        "operations.observe_scheduled",
        "nothing runs `deskgpu observe` often enough: a schedule counts only if systemd loads "
        "its unit (drop-ins applied) and its timer is active, or cron reads its file (Debian's "
        "name and syntax rules) and runs; as root, at least every `reap.max_sample_gap`; with "
        "an executable program whose arguments parse with deskgpu's own CLI (warn: two "
        "schedules, or one not confirmed)",
        "the rendered `deskgpu-observe.timer`, or its line for `/etc/cron.d/deskgpu`",
    ),
    _spec(
        "operations.observe_fresh",
        "the reap history's newest observation is older than `reap.max_sample_gap` (or there "
        "is no history, or it cannot be read): reap has nothing to decide from",
        "`systemctl status deskgpu-observe.service`, `sudo deskgpu observe`",
        ("operations.observe_scheduled",),
    ),
    _spec(
        "operations.reap_scheduled",
        "nothing runs `deskgpu reap --yes` at least weekly (same rules as observe)",
        "the rendered `deskgpu-reap.timer`, or its line for `/etc/cron.d/deskgpu`",
        on=SERVER,
    ),
    _spec(
        "operations.reap_ran",
        "warn: the audit log records no `reap --yes` run in the last 8 days",
        "`systemctl status deskgpu-reap.service`, `sudo deskgpu reap --yes`",
        ("operations.reap_scheduled",),
        on=SERVER,
    ),
    _spec(
        "cluster.node",
        "this host is none of the host config's `nodes:` (by its k3s `node-name`, else its "
        "hostname)",
        "name it in `nodes:`, or render this node's files with `setup render --node NAME`",
        on=CLUSTER,
    ),
    _spec(
        "cluster.nodes",
        "a node of `nodes:` has not joined, is not Ready, or advertises other GPUs than "
        "`nodes:` gives it (warn: k3s has a node `nodes:` does not list); ok lists every node "
        "with its state",
        "on that node: render its files (`--node NAME`) and run its install.sh",
        ("kubernetes.nodes",),
        on=CLUSTER_SERVER,
    ),
    _spec(
        "cluster.joined",
        "the agent's node is not in the cluster (not joined), or not Ready",
        "`sudo systemctl status k3s-agent`, `sudo journalctl -u k3s-agent -n 50` (server URL, "
        "token), then the rendered install.sh",
        ("cluster.node",),
        on=AGENT,
    ),
    _spec(
        "cluster.labels",
        "the node's GPU labels (`skypilot.co/accelerator`, `nvidia.com/gpu.present`) differ "
        "from its `gpus:`",
        "on the server: `sudo k3s kubectl label node <node> --overwrite ...` (or rerun its "
        "install.sh)",
        ("cluster.joined",),
        on=AGENT,
    ),
    _spec(
        "cluster.gpus",
        "the node advertises another `nvidia.com/gpu` count than its `gpus:`",
        "the device plugin's pod on the node (`kubectl -n nvidia-device-plugin get pods -o "
        "wide`); restart `k3s-agent` after the container toolkit",
        ("cluster.joined",),
        on=AGENT,
    ),
    _spec(
        "cluster.shared_storage",
        "`data_root` or `checkpoint_root` is not the shared NFS mount it should be, data is "
        "writable, or checkpoints cannot be written (as root)",
        "`sudo systemctl enable --now <root>.mount`; on the server `sudo exportfs -ra`",
        ("cluster.node",),
        on=CLUSTER,
    ),
    _spec(
        "cluster.version",
        "this node's deskgpu differs from the server's (its node's `deskgpu.io/version`); "
        "warn: the server recorded none",
        "install the same deskgpu on every node (step 3 of docs/setup.md), rerun the server's "
        "install.sh",
        ("cluster.joined",),
        on=AGENT,
    ),
    _spec(
        "cluster.clock",
        "the clock is not NTP-synchronised, or an agent's is more than 2 s off the server's",
        "`sudo timedatectl set-ntp true`, `timedatectl timesync-status`",
        ("cluster.node",),
        on=CLUSTER,
    ),
    _spec(
        "telemetry.prometheus",
        "with `telemetry:`: the Prometheus at `telemetry.prometheus` does not answer `/-/ready` "
        "or an API query (skip: no `telemetry:`)",
        "`sudo systemctl status prometheus` on the server node; the URL in the host config",
        on=SERVER,
    ),
    _spec(
        "telemetry.targets",
        "a node of the config (or the single box) has no `dcgm-exporter` or `node-exporter` "
        "target, or one not `up` (its `lastError`) or not scraped within `stale_after`; warn: "
        "a target of those jobs the config does not name",
        "that node's dcgm-exporter (the rendered Helm values) or `prometheus-node-exporter`; "
        "the rendered `/etc/prometheus/prometheus.yml`",
        ("telemetry.prometheus",),
        on=SERVER,
    ),
    _spec(
        "telemetry.pod_labels",
        "a SkyPilot pod's GPU series carry no `skypilot_cluster_name`/`skypilot_cluster` "
        "(dcgm-exporter does not copy the pod labels; warn: no `skypilot_user`); skip: no GPU "
        "allocated to a SkyPilot pod right now",
        "install dcgm-exporter with the rendered `/etc/deskgpu/dcgm-exporter-values.yaml`",
        ("telemetry.prometheus",),
        on=SERVER,
    ),
)
BY_ID = {spec.id: spec for spec in REGISTRY}
CHECK_IDS = tuple(BY_ID)


def readme_table() -> str:
    """docs/doctor.md's check table (Markdown), one row per check, in report order."""
    rows = [
        "| id | fails / warns when | fix it gives | needs | runs on |",
        "|---|---|---|---|---|",
    ]
    for spec in REGISTRY:
        needs = ", ".join(f"`{n}`" for n in spec.needs)
        rows.append(f"| `{spec.id}` | {spec.when} | {spec.fix} | {needs} | {PLACES[spec.on]} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(readme_table(), end="")
