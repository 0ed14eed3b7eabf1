"""GPU allocation as Kubernetes sees it: the kubelet's pod-resources socket (a real gRPC
server on a unix socket in tmp), the pods' NVIDIA_VISIBLE_DEVICES (a real /proc-like tree),
and what `deskgpu queue` shows of it: an allocated GPU is never free."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from deskgpu import allocation, podresources
from deskgpu import queue as survey
from deskgpu.attribution import PodIndex, PodInfo
from deskgpu.config import HostConfig
from deskgpu.snapshot import Gpu, Snapshot
from tests.podresources_server import serving

FIXTURES = Path(__file__).parent / "fixtures"
UUID = "GPU-0000000{}-aaaa-bbbb-cccc-ddddeeeeffff"
POD = "0b1c2d3e-4f50-4617-8899-aabbccddeeff"


def response(name: str) -> dict[str, Any]:
    doc = json.loads((FIXTURES / "podresources" / f"{name}.json").read_text())
    return dict(doc["response"])


def gpus(n: int = 4) -> list[Gpu]:
    return [Gpu(index=i, uuid=UUID.format(i)) for i in range(n)]


def kubelet(tmp_path: Path) -> Path:
    # short: a unix socket path has a 108-byte limit
    return tmp_path / "k"


def test_list_over_a_real_socket(tmp_path: Path) -> None:
    root = kubelet(tmp_path)
    with serving(allocation.socket_path(root), response("bob_notebook_two_gpus")) as calls:
        listed = podresources.list_devices(allocation.socket_path(root))
    assert calls == ["List"]
    assert listed[0].pod == "bob-notebook-9f1c-head" and listed[0].container == "ray-node"
    assert listed[0].resource_name == "nvidia.com/gpu"
    assert listed[0].device_ids == (UUID.format(1), UUID.format(2))
    assert ("kube-system", "") in {(d.namespace, d.resource_name) for d in listed}


def test_socket_is_preferred_and_said(tmp_path: Path) -> None:
    root = kubelet(tmp_path)
    with serving(allocation.socket_path(root), response("bob_notebook_two_gpus")):
        view = allocation.read(gpus(), PodIndex(), tmp_path / "proc", root)
    assert view.source == "pod-resources" and view.note is None
    by_name = {p.pod_name: p for p in view.pods}
    bob = by_name["bob-notebook-9f1c-head"]
    assert bob.gpus == [1, 2] and bob.cluster_name_on_cloud == "bob-notebook-9f1c"
    assert by_name["coredns-7b98449c4-x2x7q"].gpus == []  # listed, no devices: known none
    other = by_name["someone-elses-pod"]
    assert other.gpus == [3] and other.cluster_name_on_cloud is None


def test_time_sliced_replicas_and_mig_slices(tmp_path: Path) -> None:
    root = kubelet(tmp_path)
    doc = {
        "podResources": [
            {
                "name": "a-1-head",
                "namespace": "default",
                "containers": [
                    {
                        "name": "c",
                        "devices": [
                            {
                                "resourceName": "nvidia.com/gpu.shared",
                                "deviceIds": [f"{UUID.format(0)}::1", f"{UUID.format(0)}::3"],
                            },
                            {"resourceName": "nvidia.com/mig-1g.10gb", "deviceIds": ["MIG-9f"]},
                        ],
                    }
                ],
            }
        ]
    }
    with serving(allocation.socket_path(root), doc):
        view = allocation.read(gpus(), PodIndex(), tmp_path / "proc", root)
    (pod,) = view.pods
    assert pod.gpus == [0] and pod.unmapped == ["MIG-9f"]


def write_proc(
    root: Path, pid: int, pod: str, container: str, environ: dict[str, str] | None
) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    slice_ = f"kubepods-besteffort-pod{pod.replace('-', '_')}.slice"
    (d / "cgroup").write_text(
        f"0::/kubepods.slice/kubepods-besteffort.slice/{slice_}/cri-containerd-{container}.scope\n"
    )
    if environ is None:
        (d / "environ").mkdir()  # unreadable as a file, even for root
    else:
        (d / "environ").write_bytes(
            b"".join(f"{k}={v}".encode() + b"\0" for k, v in environ.items())
        )


def pod_tree(tmp_path: Path, devices: str | None) -> tuple[Path, Path]:
    """A pod with a pause container and a main container whose env the device plugin set."""
    proc = tmp_path / "proc"
    (proc / "1").mkdir(parents=True)
    (proc / "1" / "cgroup").write_text("0::/init.scope\n")
    write_proc(proc, 700, POD, "aa" * 32, {"PATH": "/pause"})
    env = None if devices is None else {"PATH": "/usr/bin", "NVIDIA_VISIBLE_DEVICES": devices}
    write_proc(proc, 701, POD, "bb" * 32, env)
    write_proc(proc, 702, POD, "bb" * 32, env)
    root = kubelet(tmp_path)
    hosts = root / "pods" / POD / "etc-hosts"
    hosts.parent.mkdir(parents=True)
    hosts.write_text("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n"
                     "10.42.0.17\tbob-notebook-9f1c-head\n")  # fmt: skip
    return proc, root


def test_environ_when_there_is_no_socket(tmp_path: Path) -> None:
    proc, root = pod_tree(tmp_path, f"{UUID.format(1)},{UUID.format(2)}")
    view = allocation.read(gpus(), PodIndex(), proc, root)
    assert view.source == "environ"
    assert view.note is not None and "no pod-resources socket" in view.note
    (pod,) = view.pods
    assert pod.pod_uid == POD and pod.pod_name == "bob-notebook-9f1c-head"
    assert pod.cluster_name_on_cloud == "bob-notebook-9f1c" and pod.gpus == [1, 2]


def test_environ_after_the_socket_fails(tmp_path: Path) -> None:
    proc, root = pod_tree(tmp_path, "1")  # indices are allowed too
    with serving(allocation.socket_path(root), fail="UNAVAILABLE") as calls:
        view = allocation.read(gpus(), PodIndex(), proc, root, timeout_s=5)
    assert calls == ["List"]
    assert view.source == "environ" and view.pods[0].gpus == [1]
    assert view.note is not None and "List UNAVAILABLE" in view.note


@pytest.mark.parametrize(
    ("devices", "why"),
    [
        ("all", "names no device list"),  # the CUDA image's own default, not an allocation
        ("/var/run/nvidia-container-devices", "names no device list"),  # volume-mounts
        (None, "not readable"),
    ],
)
def test_environ_that_says_nothing_is_unknown_not_none(
    tmp_path: Path, devices: str | None, why: str
) -> None:
    proc, root = pod_tree(tmp_path, devices)
    view = allocation.read(gpus(), PodIndex(), proc, root)
    assert view.pods == [] and view.source is None
    assert view.note is not None and why in view.note


def test_no_pod_at_all_is_known_none(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "1").mkdir(parents=True)
    (proc / "1" / "cgroup").write_text("0::/init.scope\n")
    view = allocation.read(gpus(), PodIndex(), proc, kubelet(tmp_path))
    assert view.source == "environ" and view.pods == []


def test_pod_index_labels_name_the_cluster(tmp_path: Path) -> None:
    proc, root = pod_tree(tmp_path, UUID.format(2))
    labels = {"skypilot-cluster": "bob-notebook-9f1c", "deskgpu.io/user": "bob"}
    pods = PodIndex({POD: PodInfo(POD, "whatever", "default", labels)})
    view = allocation.read(gpus(), pods, proc, root)
    assert view.pods[0].cluster_name_on_cloud == "bob-notebook-9f1c"
    holder = allocation.holder(view.pods[0], pods)
    assert holder.user == "bob" and holder.kind == "skypilot"


# ---- deskgpu queue ----------------------------------------------------------------------


def busy_box() -> Snapshot:
    doc = json.loads((FIXTURES / "snapshots" / "busy_box.json").read_text())
    return Snapshot.from_dict(doc)


def take_with_socket(tmp_path: Path) -> Snapshot:
    recorded = busy_box()
    root = kubelet(tmp_path)
    sources = survey.Sources(
        read_nvml=lambda: recorded.nvml,
        fetch_sky=lambda _c: recorded.sky,
        read_notices=lambda _c: [],
        proc_root=tmp_path / "proc",
        kubelet_root=root,
    )
    with serving(allocation.socket_path(root), response("bob_notebook_two_gpus")):
        return survey.take(HostConfig(), sources)


def test_an_allocated_gpu_is_never_free(tmp_path: Path) -> None:
    snap = take_with_socket(tmp_path)
    gpu2, gpu3 = snap.nvml.gpus[2], snap.nvml.gpus[3]
    assert gpu2.allocated_to is not None and gpu2.allocated_to.label == "bob/notebook"
    assert not gpu2.is_free and gpu2.allocated_idle
    assert (
        gpu3.allocated_to is not None
        and gpu3.allocated_to.label == "pod research/someone-elses-pod"
    )
    summary = survey.summarize(snap)
    assert summary.gpus_free == 0 and summary.gpus_allocated_idle == 2
    assert summary.line().startswith("0 of 4 GPUs free · 2 allocated, idle")
    (row,) = survey.sessions(snap)
    assert row.use.allocated_gpu_indexes == (1, 2) and row.use.held_indexes == (1, 2)


def test_queue_shows_allocated_idle_and_json_carries_allocated_to(tmp_path: Path, cli) -> None:
    recorded = tmp_path / "q.json"
    recorded.write_text(json.dumps(survey.document(take_with_socket(tmp_path))))
    table = cli("queue", "--snapshot", str(recorded), env={"COLUMNS": "160"})
    assert table.exit_code == 0, table.stderr
    gpu2 = next(line for line in table.stdout.splitlines() if line.startswith("│   2 "))
    assert "bob/notebook (allocated, idle)" in gpu2 and "free" not in gpu2
    assert "0 of 4 GPUs free · 2 allocated, idle" in table.stdout
    out = cli("queue", "--snapshot", str(recorded), "--json")
    doc = json.loads(out.stdout)
    allocated = doc["nvml"]["gpus"][2]["allocated_to"]
    assert allocated["cluster"] == "bob-notebook" and allocated["user"] == "bob"
    assert doc["nvml"]["gpus"][0]["allocated_to"] is None
    assert doc["allocation"]["source"] == "pod-resources"
    assert doc["summary"]["gpus_free"] == 0 and doc["summary"]["gpus_allocated_idle"] == 2


def test_unknown_allocation_is_said_when_a_gpu_looks_free(tmp_path: Path) -> None:
    recorded = busy_box()
    (tmp_path / "proc").mkdir()  # no PID 1 visible: as under hidepid
    sources = survey.Sources(
        read_nvml=lambda: recorded.nvml,
        fetch_sky=lambda _c: recorded.sky,
        read_notices=lambda _c: [],
        proc_root=tmp_path / "proc",
        kubelet_root=kubelet(tmp_path),
    )
    snap = survey.take(HostConfig(), sources)
    assert snap.allocation.source is None
    assert any("a GPU shown free may be allocated" in n for n in snap.nvml.notes)
    assert survey.summarize(snap).gpus_free == 2  # as before: nothing known says otherwise
