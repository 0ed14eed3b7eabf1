"""Host PID -> pod -> SkyPilot -> researcher, on real /proc-shaped trees built in tmp_path.

The cgroup lines are the formats k3s/containerd actually write (cgroup v1 cgroupfs and
systemd drivers, cgroup v2 unified); `kubectl` is a real executable script printing a
recorded `kubectl get pods -o json`.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
from pathlib import Path

import pytest

from deskgpu import attribution
from deskgpu.attribution import PodIndex, PodInfo
from deskgpu.snapshot import (
    HOLDER_HIDDEN,
    HOLDER_SKYPILOT,
    HOLDER_UNMANAGED,
    Cluster,
    Gpu,
    GpuProcess,
    Job,
    NvmlView,
    SkyView,
    Snapshot,
)

UID = "5f2b3c1e-0d4a-4b7e-9a51-2f6c8e9d0a11"
UID_ = UID.replace("-", "_")
CID = "3f4e5d6c7b8a9f0e1d2c3b4a5f6e7d8c9b0a1f2e3d4c5b6a7f8e9d0c1b2a3f4e"

CGROUP_V1_CGROUPFS = "\n".join(
    f"{n}:{c}:/kubepods/besteffort/pod{UID}/{CID}"
    for n, c in [(12, "pids"), (11, "memory"), (4, "devices"), (1, "name=systemd")]
)
CGROUP_V1_SYSTEMD = (
    f"11:devices:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
    f"cri-containerd-{CID}.scope\n"
    f"1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
    f"cri-containerd-{CID}.scope\n"
)
CGROUP_V2_SYSTEMD = (
    f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
    f"cri-containerd-{CID}.scope\n"
)
CGROUP_V2_CGROUPFS_GUARANTEED = f"0::/kubepods/pod{UID}/{CID}\n"
CGROUP_HOST_SHELL = "0::/user.slice/user-1000.slice/session-3.scope\n"
CGROUP_DOCKER = f"0::/system.slice/docker-{CID}.scope\n"

POD_LABELS = {
    "skypilot-cluster": "alice-bert-finetune-2ea4",
    "skypilot-user": "alice",
    "deskgpu.io/user": "alice",
    "deskgpu.io/job": "bert-finetune",
    "deskgpu.io/kind": "batch",
    "parent": "skypilot",
}


def files_owner() -> str:
    """Who owns the /proc-shaped files written here: whoever runs the suite (not always root)."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid with no passwd entry (some containers) shows as its number
        return f"uid{uid}"


def make_proc(
    root: Path, pid: int | str, cgroup: str | None, cmdline: str = "python\0train.py\0"
) -> None:
    base = root / str(pid)
    base.mkdir(parents=True)
    if cgroup is not None:
        (base / "cgroup").write_text(cgroup)
    (base / "cmdline").write_text(cmdline)


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    make_proc(root, "self", CGROUP_HOST_SHELL)
    return root


@pytest.mark.parametrize(
    "cgroup",
    [CGROUP_V1_CGROUPFS, CGROUP_V1_SYSTEMD, CGROUP_V2_SYSTEMD, CGROUP_V2_CGROUPFS_GUARANTEED],
    ids=["v1-cgroupfs", "v1-systemd", "v2-systemd", "v2-cgroupfs-guaranteed"],
)
def test_pod_uid_from_real_cgroup_formats(cgroup: str) -> None:
    assert attribution.pod_uid_from_cgroup(cgroup) == UID


def test_host_and_docker_processes_have_no_pod() -> None:
    assert attribution.pod_uid_from_cgroup(CGROUP_HOST_SHELL) is None
    assert attribution.pod_uid_from_cgroup(CGROUP_DOCKER) is None
    assert attribution.container_id_from_cgroup(CGROUP_DOCKER) == CID


def snapshot_with(*pids_per_gpu: list[int]) -> Snapshot:
    gpus = [
        Gpu(index=i, processes=[GpuProcess(pid=p, used_memory_mib=1000.0) for p in pids])
        for i, pids in enumerate(pids_per_gpu)
    ]
    return Snapshot(taken_at=0.0, nvml=NvmlView(available=True, gpus=gpus))


def test_skypilot_pod_process_is_attributed_to_the_researcher(proc: Path, tmp_path: Path) -> None:
    make_proc(proc, 41233, CGROUP_V2_SYSTEMD)
    pods = PodIndex(
        pods={UID: PodInfo(UID, "alice-bert-finetune-2ea4-head", "default", POD_LABELS)}
    )
    snap = snapshot_with([41233])
    attribution.attribute(snap, pods, proc, tmp_path / "kubelet")
    holder = snap.nvml.gpus[0].processes[0].holder
    assert holder is not None
    assert (holder.kind, holder.user, holder.job, holder.job_kind) == (
        HOLDER_SKYPILOT,
        "alice",
        "bert-finetune",
        "batch",
    )
    assert holder.cluster_name_on_cloud == "alice-bert-finetune-2ea4"
    assert holder.unix_user == files_owner()  # the PID's owner: what gpustat/nvitop show
    assert holder.label == "alice/bert-finetune"


def test_plain_sky_launch_pod_falls_back_to_skypilot_user(proc: Path, tmp_path: Path) -> None:
    make_proc(proc, 5, CGROUP_V1_CGROUPFS)
    labels = {"skypilot-cluster": "sky-4b2c-carol-abcd", "skypilot-user": "carol"}
    snap = snapshot_with([5])
    attribution.attribute(
        snap, PodIndex(pods={UID: PodInfo(UID, "x-head", "ns", labels)}), proc, tmp_path
    )
    holder = snap.nvml.gpus[0].processes[0].holder
    assert holder is not None and holder.user == "carol" and holder.job is None


def test_unmanaged_host_process(proc: Path, tmp_path: Path) -> None:
    make_proc(proc, 9911, CGROUP_HOST_SHELL, "/home/gina/.venv/bin/python\0train.py\0")
    snap = snapshot_with([9911])
    attribution.attribute(snap, PodIndex(), proc, tmp_path)
    holder = snap.nvml.gpus[0].processes[0].holder
    assert holder is not None and holder.kind == HOLDER_UNMANAGED
    assert holder.command == "/home/gina/.venv/bin/python train.py"
    assert holder.unix_user == files_owner()
    assert snap.nvml.notes == []


def test_docker_run_outside_kubernetes_is_unmanaged_with_its_container(
    proc: Path, tmp_path: Path
) -> None:
    make_proc(proc, 77, CGROUP_DOCKER)
    snap = snapshot_with([77])
    attribution.attribute(snap, PodIndex(), proc, tmp_path)
    holder = snap.nvml.gpus[0].processes[0].holder
    assert holder is not None and holder.kind == HOLDER_UNMANAGED
    assert CID[:12] in (holder.note or "")


def test_vanished_pid_is_skipped_with_a_note(proc: Path, tmp_path: Path) -> None:
    make_proc(proc, 1, CGROUP_HOST_SHELL)
    snap = snapshot_with([1, 424242])
    attribution.attribute(snap, PodIndex(), proc, tmp_path)
    assert [p.pid for p in snap.nvml.gpus[0].processes] == [1]
    assert snap.nvml.notes == ["skipped PID(s) 424242: exited while being read"]


def test_pid_in_other_pid_namespace(tmp_path: Path) -> None:
    # deskgpu itself in a container (cgroup namespace: "0::/"): NVML's host PID is not ours.
    root = tmp_path / "proc"
    make_proc(root, "self", "0::/\n")
    snap = snapshot_with([3100442])
    attribution.attribute(snap, PodIndex(), root, tmp_path)
    holder = snap.nvml.gpus[0].processes[0].holder
    assert holder is not None and holder.kind == HOLDER_HIDDEN
    assert "another PID namespace" in (holder.note or "")


def test_one_pid_on_two_gpus_reads_proc_once_and_attributes_both(
    proc: Path, tmp_path: Path
) -> None:
    make_proc(proc, 41233, CGROUP_V2_SYSTEMD)
    pods = PodIndex(
        pods={UID: PodInfo(UID, "alice-bert-finetune-2ea4-head", "default", POD_LABELS)}
    )
    snap = snapshot_with([41233], [41233])
    attribution.attribute(snap, pods, proc, tmp_path)
    labels = [g.processes[0].holder.label for g in snap.nvml.gpus]  # type: ignore[union-attr]
    assert labels == ["alice/bert-finetune", "alice/bert-finetune"]


def test_unreadable_cgroup_is_hidden_not_a_crash(proc: Path, tmp_path: Path) -> None:
    # hidepid / ptrace restrictions: the PID exists but its files cannot be read.
    (proc / "555").mkdir()
    info = attribution.read_proc(555, proc)
    assert info.exists and info.pod_uid is None and info.command is None
    holder = attribution.holder_for(info, PodIndex(), tmp_path)
    assert holder.kind == HOLDER_UNMANAGED  # owner still known from the directory


def test_pod_without_kube_api_is_hidden_with_the_reason(proc: Path, tmp_path: Path) -> None:
    make_proc(proc, 6001, CGROUP_V2_SYSTEMD)
    snap = snapshot_with([6001])
    attribution.attribute(
        snap, PodIndex(note="pod owners hidden: kubectl not found"), proc, tmp_path / "no-kubelet"
    )
    holder = snap.nvml.gpus[0].processes[0].holder
    assert holder is not None and holder.kind == HOLDER_HIDDEN and holder.pod_uid == UID
    assert "kubectl not found" in (holder.note or "")
    assert "pod owners hidden: kubectl not found" in snap.nvml.notes


def test_kubelet_hosts_file_names_the_pod_when_the_api_cannot(proc: Path, tmp_path: Path) -> None:
    make_proc(proc, 6001, CGROUP_V1_SYSTEMD)
    kubelet = tmp_path / "kubelet"
    (kubelet / "pods" / UID).mkdir(parents=True)
    (kubelet / "pods" / UID / "etc-hosts").write_text(
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost "
        "ip6-loopback\nfe00::0\tip6-localnet\n10.42.0.17\tbob-notebook-9f1c-head\n"
    )
    snap = snapshot_with([6001])
    snap.sky = SkyView(
        available=True,
        clusters=[
            Cluster(
                name="bob-notebook",
                user="bob",
                cluster_name_on_cloud="bob-notebook-9f1c",
                labels={"deskgpu.io/job": "notebook", "deskgpu.io/kind": "interactive"},
            )
        ],
    )
    attribution.attribute(
        snap, PodIndex(note="pod owners hidden: kubectl: forbidden"), proc, kubelet
    )
    attribution.link_skypilot(snap)
    holder = snap.nvml.gpus[0].processes[0].holder
    assert holder is not None and holder.kind == HOLDER_SKYPILOT
    assert (holder.cluster, holder.user, holder.job) == ("bob-notebook", "bob", "notebook")


def test_non_skypilot_pod_is_unmanaged(proc: Path, tmp_path: Path) -> None:
    make_proc(proc, 8, CGROUP_V2_SYSTEMD)
    pods = PodIndex(pods={UID: PodInfo(UID, "ollama-0", "ai", {"app": "ollama"})})
    snap = snapshot_with([8])
    attribution.attribute(snap, pods, proc, tmp_path)
    holder = snap.nvml.gpus[0].processes[0].holder
    assert holder is not None and holder.kind == HOLDER_UNMANAGED
    assert "ai/ollama-0" in (holder.note or "")


def test_managed_job_links_to_its_job_id() -> None:
    snap = snapshot_with([1])
    snap.nvml.gpus[0].processes[0].holder = attribution.Holder(
        kind=HOLDER_SKYPILOT, cluster_name_on_cloud="alice-bert-finetune-2ea4"
    )
    snap.sky = SkyView(
        available=True,
        jobs=[
            Job(
                id=7,
                name="bert-finetune",
                user="alice",
                cluster_name_on_cloud="alice-bert-finetune-2ea4",
            )
        ],
    )
    attribution.link_skypilot(snap)
    holder = snap.nvml.gpus[0].processes[0].holder
    assert (holder.managed_job_id, holder.user, holder.job, holder.job_kind) == (
        7,
        "alice",
        "bert-finetune",
        "batch",
    )


KUBECTL_PODS = {
    "apiVersion": "v1",
    "kind": "List",
    "items": [
        {
            "metadata": {
                "name": "alice-bert-finetune-2ea4-head",
                "namespace": "default",
                "uid": UID,
                "labels": POD_LABELS,
            }
        },
        {
            "metadata": {
                "name": "coredns-abc",
                "namespace": "kube-system",
                "uid": "11111111-2222-3333-4444-555555555555",
            }
        },
    ],
}


def fake_kubectl(tmp_path: Path, body: str, code: int = 0) -> str:
    out = tmp_path / "pods.json"
    out.write_text(body)
    exe = tmp_path / "kubectl"
    exe.write_text(
        f"#!/bin/sh\ncat '{out}'\n"
        + (f"echo 'error: forbidden' >&2\nexit {code}\n" if code else "")
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(exe)


def test_pods_from_kubectl(tmp_path: Path) -> None:
    index = attribution.pods_from_kube(kubectl=fake_kubectl(tmp_path, json.dumps(KUBECTL_PODS)))
    assert index.note is None
    assert index.pods[UID].labels["deskgpu.io/user"] == "alice"
    assert index.pods[UID].namespace == "default"


def test_kubectl_refusing_is_a_note(tmp_path: Path) -> None:
    index = attribution.pods_from_kube(kubectl=fake_kubectl(tmp_path, "", code=1))
    assert index.pods == {} and index.note == "pod owners hidden: kubectl: error: forbidden"


def test_kubectl_missing_is_a_note(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert attribution.pods_from_kube().note == "pod owners hidden: kubectl not found"


def test_in_container_detection(tmp_path: Path) -> None:
    for text, expected in [
        ("0::/\n", True),
        (CGROUP_V2_SYSTEMD, True),
        (CGROUP_HOST_SHELL, False),
        ("0::/init.scope\n", False),
    ]:
        root = tmp_path / str(abs(hash(text)))
        make_proc(root, "self", text)
        assert attribution.in_container(root) is expected, text
    assert attribution.in_container(tmp_path / "nothing") is False


def test_real_proc_self_is_readable() -> None:
    info = attribution.read_proc(os.getpid())
    assert info.exists and info.command
