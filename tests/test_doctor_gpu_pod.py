"""`deskgpu doctor --gpu-pod` (kubernetes.gpu_pod): one 1-GPU pod, run the way a job's pod runs.

No k3s here: a fake `kubectl` first on PATH (tests/fakekubectl.py) replays kubectl's answers
from tests/fixtures/gpu_pod/ (their README says where each came from) to the same probe and
check the live run uses; every fact goes through `--record`'s JSON round trip before it is
judged. Each case is named after what went wrong on the box.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from deskgpu.config import HostConfig, load_config
from deskgpu.doctor import gpupod, probes
from deskgpu.doctor.checks import FAIL, OK, SKIP, WARN, Check, run_checks
from deskgpu.doctor.checks.gpu_pod import check_gpu_pod
from deskgpu.doctor.facts import CommandResult, GpuPodFact, HostFacts
from deskgpu.house_rules import check_house_rules
from deskgpu.kubenames import JOB_SERVICE_ACCOUNT, JOBS_NAMESPACE
from deskgpu.labels import LABEL_USER
from deskgpu.setup.render import job_identity_manifest
from tests import fakekubectl

DOCTOR_FIXTURES = Path(__file__).parent / "fixtures" / "doctor"
BOX_CONFIG = DOCTOR_FIXTURES / "host-config.yaml"
HEALTHY = json.loads((DOCTOR_FIXTURES / "healthy-4x-a6000.json").read_text())
NODES = CommandResult(**HEALTHY["commands"]["kube_nodes"])
RECORDED = fakekubectl.recorded_answers(HEALTHY)


@dataclass
class Kubectl:
    """The fake kubectl of one test: `case()` picks its answers, `calls()` says what it saw."""

    bin_dir: Path
    state: Path

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin_dir}:/usr/bin:/bin"}

    def case(self, name: str, **extra: Any) -> None:
        fakekubectl.write_case(self.state, name, RECORDED, **extra)

    def calls(self) -> list[list[str]]:
        return [c["args"] for c in fakekubectl.calls(self.state)]

    def created(self) -> dict[str, Any]:
        (stdin,) = [c["stdin"] for c in fakekubectl.calls(self.state) if c["stdin"]]
        doc: dict[str, Any] = json.loads(stdin)
        return doc


@pytest.fixture(autouse=True)
def _quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probes, "GPU_POD_POLL_S", 0.2)  # the box's 1 s, for in-process runs


@pytest.fixture
def kubectl(tmp_path: Path) -> Kubectl:
    fake = Kubectl(tmp_path / "bin", tmp_path / "kubectl-state")
    fakekubectl.install(fake.bin_dir, fake.state)
    return fake


def box_config(**changes: Any) -> HostConfig:
    from dataclasses import replace

    return replace(load_config(BOX_CONFIG), **changes)


def run_probe(
    kubectl: Kubectl,
    case: str,
    wait_s: float = 20.0,
    stop: probes.StopFlag | None = None,
    config: HostConfig | None = None,
    **extra: Any,
) -> GpuPodFact:
    kubectl.case(case, **extra)
    return probes.probe_gpu_pod(
        config or box_config(), kubectl.env, NODES, 3.0, wait_s, stop or probes.StopFlag()
    )


def judge(fact: GpuPodFact, config: HostConfig | None = None) -> Check:
    """The verdict on `fact` after the round trip `--record` / `--facts` makes."""
    config = config or box_config()
    recorded = HostFacts(gathered_at=time.time(), gpu_pod=fact).to_dict()
    replayed = HostFacts.from_dict(json.loads(json.dumps(recorded)))
    (check,) = check_gpu_pod(replayed, config, config.doctor)
    return check


def deleted(kubectl: Kubectl, fact: GpuPodFact) -> bool:
    """The last thing doctor asked was to delete its pod, without waiting for it."""
    last = kubectl.calls()[-1]
    return last[:3] == ["delete", "pod", fact.pod] and "--ignore-not-found" in last


# ---------------------------------------------------------------------------------------
# What the pod is: a job's pod, as the house rules and SkyPilot make it.


def test_the_pod_is_shaped_like_a_jobs_pod(kubectl: Kubectl) -> None:
    fact = run_probe(kubectl, "success")
    sent = kubectl.created()
    assert sent == fact.manifest
    spec = sent["spec"]
    # The namespace and service account of the rendered kube/deskgpu-job.yaml.
    identity = list(yaml.safe_load_all(job_identity_manifest(box_config())))
    (account,) = [o for o in identity if o and o["kind"] == "ServiceAccount"]
    assert spec["serviceAccountName"] == account["metadata"]["name"] == JOB_SERVICE_ACCOUNT
    assert sent["metadata"]["namespace"] == account["metadata"]["namespace"] == JOBS_NAMESPACE
    assert spec["runtimeClassName"] == "nvidia"  # the fake cluster lists RuntimeClass nvidia
    (container,) = spec["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert container["command"] == ["nvidia-smi", "-L"]
    assert container["image"] == gpupod.CUDA_IMAGE  # the fixtures' config has no default_image
    assert spec["restartPolicy"] == "Never"
    # Every part of the house rules' pod_config is in the pod, and its labels.
    shaped = gpupod.shaped_task(box_config(), fact.pod)
    pod_config = gpupod.pod_config_of(shaped)
    assert pod_config is not None
    for volume in pod_config["spec"]["volumes"]:
        assert volume in spec["volumes"]
    for mount in pod_config["spec"]["containers"][0]["volumeMounts"]:
        assert mount in container["volumeMounts"]
    for key, value in shaped["resources"]["labels"].items():
        assert sent["metadata"]["labels"][key] == value
    assert sent["metadata"]["labels"][gpupod.DOCTOR_LABEL] == gpupod.DOCTOR_LABEL_VALUE
    # The checkpoint subPath is the owner label, as the cluster's admission policy demands.
    (checkpoints,) = [m for m in container["volumeMounts"] if m.get("subPath")]
    assert checkpoints["subPath"] == sent["metadata"]["labels"][LABEL_USER]
    assert check_house_rules(shaped, box_config(), gpupod.DOCTOR_USER) == []


def test_the_pod_config_is_merged_as_skypilot_merges_it() -> None:
    from sky.utils.config_utils import merge_k8s_configs

    config = box_config(default_image="nvcr.io/nvidia/pytorch:24.05-py3")
    name = gpupod.pod_name("abc123")
    ours = gpupod.pod_manifest(config, name, runtime_class=False, wait_s=60)
    task = gpupod.shaped_task(config, name)
    pod_config = gpupod.pod_config_of(task)
    assert pod_config is not None
    theirs = gpupod.bare_pod(task, name, 60)
    merge_k8s_configs(theirs, pod_config)
    assert theirs == ours
    assert ours["spec"]["containers"][0]["image"] == "nvcr.io/nvidia/pytorch:24.05-py3"


def test_without_a_nvidia_runtime_class_the_pod_asks_for_none(kubectl: Kubectl) -> None:
    fact = run_probe(kubectl, "no-runtime-class")
    assert "runtimeClassName" not in kubectl.created()["spec"]
    check = judge(fact)
    assert check.status == OK
    assert "no runtime class" in check.detail


# ---------------------------------------------------------------------------------------
# Verdicts, one per thing that goes wrong.


def test_a_pod_that_ran_nvidia_smi_and_saw_an_a6000_is_ok(kubectl: Kubectl) -> None:
    fact = run_probe(kubectl, "success")
    assert (fact.timed_out, fact.interrupted, fact.polls) == (False, None, 3)
    check = judge(fact)
    assert check.status == OK, check
    assert "saw NVIDIA RTX A6000 (GPU-5d1e8b5e-8f2a-4c1e-9d3b-6a7f0c2e9b41)" in check.detail
    assert "on node deskbox" in check.detail
    assert "inventory's A6000" in check.detail
    assert check.fix is None
    assert deleted(kubectl, fact)
    asked = [" ".join(c[:2]) for c in kubectl.calls()]
    assert asked[:3] == ["get runtimeclasses", "get pods", "create -f"]
    assert "logs " + fact.pod in [" ".join(c[:2]) for c in kubectl.calls()]


def test_unschedulable_for_want_of_a_gpu_fails_at_once(kubectl: Kubectl) -> None:
    fact = run_probe(kubectl, "unschedulable", wait_s=60)
    assert fact.waited_s < 10 and not fact.timed_out  # the scheduler's word is enough
    check = judge(fact)
    assert check.status == FAIL
    assert "is unschedulable: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu" in (
        check.detail
    )
    assert check.fix is not None and "deskgpu queue" in check.fix
    assert deleted(kubectl, fact)


def test_nvidia_smi_failing_in_the_pod_fails_with_what_it_said(kubectl: Kubectl) -> None:
    fact = run_probe(kubectl, "nvidia-smi-fails")
    check = judge(fact)
    assert check.status == FAIL
    assert "nvidia-smi failed in pod default/deskgpu-doctor-gpu-" in check.detail
    assert "(exit 9): NVIDIA-SMI has failed because it couldn't communicate" in check.detail
    assert check.fix is not None and "nvidia-container-runtime" in check.fix
    assert deleted(kubectl, fact)


def test_a_pod_still_pulling_at_the_timeout_fails_and_is_deleted(kubectl: Kubectl) -> None:
    start = time.monotonic()
    fact = run_probe(kubectl, "still-pulling", wait_s=2)
    assert time.monotonic() - start < 10
    assert fact.timed_out and fact.waited_s >= 2
    check = judge(fact)
    assert check.status == FAIL
    assert "was still pulling its image nvidia/cuda:12.2.2-base-ubuntu22.04 after 2 s" in (
        check.detail
    )
    assert check.fix is not None and "--gpu-pod-timeout" in check.fix
    assert deleted(kubectl, fact)


def test_no_nvidia_runtime_in_containerd_is_named_from_the_events(kubectl: Kubectl) -> None:
    fact = run_probe(kubectl, "no-runtime-handler", wait_s=2)
    check = judge(fact)
    assert check.status == FAIL
    assert (
        "FailedCreatePodSandBox: Failed to create pod sandbox: rpc error: code = Unknown desc"
        ' = failed to get sandbox runtime: no runtime for "nvidia" is configured' in check.detail
    )
    assert check.fix is not None and "containerd" in check.fix
    assert deleted(kubectl, fact)


def test_an_image_that_cannot_be_pulled_fails_at_once(kubectl: Kubectl) -> None:
    fact = run_probe(kubectl, "image-pull-backoff", wait_s=60)
    assert not fact.timed_out
    check = judge(fact)
    assert check.status == FAIL
    assert "cannot get its image nvidia/cuda:12.2.2-base-ubuntu22.04: ImagePullBackOff" in (
        check.detail
    )
    assert deleted(kubectl, fact)


def test_a_pod_given_one_gpu_that_sees_all_four_fails(kubectl: Kubectl) -> None:
    check = judge(run_probe(kubectl, "sees-every-gpu"))
    assert check.status == FAIL
    assert "was given 1 GPU and nvidia-smi in it saw 4" in check.detail


def test_a_gpu_of_another_model_than_the_inventory_fails(kubectl: Kubectl) -> None:
    check = judge(run_probe(kubectl, "another-model"))
    assert check.status == FAIL
    assert "saw NVIDIA GeForce RTX 4090" in check.detail
    assert "not a GPU of the inventory (4x A6000)" in check.detail


def test_no_inventory_to_compare_with_is_a_warning_not_ok(kubectl: Kubectl) -> None:
    fact = run_probe(kubectl, "success")
    check = judge(fact, box_config(gpus={}))
    assert check.status == WARN
    assert check.fix is not None and "gpus:" in check.fix


def test_a_missing_service_account_is_refused_and_named(kubectl: Kubectl) -> None:
    refused = (
        'Error from server (Forbidden): error when creating "STDIN": pods '
        '"deskgpu-doctor-gpu-3f9c2a" is forbidden: error looking up service account '
        'default/deskgpu-job: serviceaccount "deskgpu-job" not found\n'
    )
    fact = run_probe(kubectl, "success", create={"returncode": 1, "stderr": refused})
    check = judge(fact)
    assert check.status == FAIL
    assert "the API refused pod default/" in check.detail
    assert 'serviceaccount "deskgpu-job" not found' in check.detail
    assert check.fix is not None and "kube/deskgpu-job.yaml" in check.fix
    assert deleted(kubectl, fact)  # a create that failed (or timed out) may still have made it


def test_pods_a_killed_run_left_are_deleted_next_time(kubectl: Kubectl) -> None:
    recorded = json.loads((fakekubectl.FIXTURES / "pods.json").read_text())["succeeded"]

    def left(name: str, created: datetime) -> dict[str, Any]:
        pod = json.loads(json.dumps(recorded))
        pod["metadata"].update(name=name, creationTimestamp=created.strftime("%Y-%m-%dT%H:%M:%SZ"))
        return pod

    now = datetime.now(timezone.utc)
    old, running = "deskgpu-doctor-gpu-0ld0ld", "deskgpu-doctor-gpu-0ther5"
    listing = {
        "apiVersion": "v1",
        "items": [left(old, datetime(2025, 6, 9, tzinfo=timezone.utc)), left(running, now)],
        "kind": "List",
        "metadata": {"resourceVersion": ""},
    }
    fact = run_probe(kubectl, "success", leftovers=listing)
    removed = [c for c in kubectl.calls() if c[:2] == ["delete", "pod"] and old in c]
    assert removed == [
        ["delete", "pod", old, "-n", "default", "--wait=false", "--ignore-not-found"]
    ]
    assert not any(running in c for c in kubectl.calls())  # another doctor's, still in its run
    assert ["get", "pods", "-n", "default", "-l", gpupod.SELECTOR, "-o", "json"] in (
        kubectl.calls()
    )
    check = judge(fact)
    assert check.status == OK
    assert f"deleted 1 pod(s) an earlier run left: {old}" in check.detail


def test_a_stop_mid_wait_deletes_the_pod_and_fails(kubectl: Kubectl) -> None:
    stop = probes.StopFlag()
    timer = threading.Timer(1.5, stop.set, args=("SIGTERM",))
    timer.start()
    try:
        fact = run_probe(kubectl, "still-pulling", wait_s=60, stop=stop)
    finally:
        timer.cancel()
    assert fact.interrupted == "SIGTERM" and not fact.timed_out
    assert deleted(kubectl, fact)
    check = judge(fact)
    assert check.status == FAIL
    assert check.detail.startswith("interrupted by SIGTERM")


def test_a_cluster_without_gpus_starts_no_pod(kubectl: Kubectl) -> None:
    nodes = json.loads(NODES.stdout)
    for node in nodes["items"]:
        node["status"]["allocatable"].pop("nvidia.com/gpu")
    kubectl.case("success")
    fact = probes.probe_gpu_pod(
        box_config(),
        kubectl.env,
        CommandResult(argv=NODES.argv, returncode=0, stdout=json.dumps(nodes)),
        3.0,
        20.0,
        probes.StopFlag(),
    )
    assert fact.not_started == "no node advertises nvidia.com/gpu"
    assert kubectl.calls() == []
    assert judge(fact).status == FAIL  # the registry skips it: gpu_allocatable fails first


# ---------------------------------------------------------------------------------------
# Through the registry and the real CLI.


def test_without_the_flag_it_is_a_skip_that_says_how_to_run_it() -> None:
    facts = HostFacts.from_dict(json.loads((DOCTOR_FIXTURES / "healthy-4x-a6000.json").read_text()))
    (check,) = [c for c in run_checks(facts, box_config()) if c.id == "kubernetes.gpu_pod"]
    assert check.status == SKIP
    assert "`sudo deskgpu doctor --gpu-pod`" in check.detail


def box_config_file(tmp_path: Path, endpoint: str) -> Path:
    """The fixtures' box, its API server on the test's dead port."""
    path = tmp_path / "box.yaml"
    path.write_text(
        "# Written by tests/test_doctor_gpu_pod.py: the 4x A6000 box, API server down.\n"
        f"box_name: deskbox\ninfra: k8s\napi_server: {endpoint}\ngpus: {{A6000: 4}}\n"
    )
    return path


def gpu_pod_check(stdout: str) -> dict[str, Any]:
    (check,) = [c for c in json.loads(stdout)["checks"] if c["id"] == "kubernetes.gpu_pod"]
    return dict(check)


def test_doctor_without_gpu_pod_starts_nothing(cli, kubectl: Kubectl, tmp_path, hermetic) -> None:
    kubectl.case("success")
    config = box_config_file(tmp_path, hermetic.endpoint)
    result = cli("doctor", "--json", "--config", str(config), env=kubectl.env)
    assert result.exit_code == 3, result.stderr  # no driver, no docker daemon here
    check = gpu_pod_check(result.stdout)
    assert check["status"] == "skip"
    assert "--gpu-pod" in check["detail"]
    assert not any(c[0] in ("create", "delete") for c in kubectl.calls())
    assert ["get", "nodes", "-o", "json"] in kubectl.calls()  # the other kube probes ran


def test_doctor_gpu_pod_recorded_then_replayed(cli, kubectl: Kubectl, tmp_path, hermetic) -> None:
    kubectl.case("success")
    config = str(box_config_file(tmp_path, hermetic.endpoint))
    facts = tmp_path / "gpu-pod-facts.json"
    live = cli("doctor", "--gpu-pod", "--json", "--record", str(facts), "--config", config,
               env=kubectl.env)  # fmt: skip
    check = gpu_pod_check(live.stdout)
    assert check["status"] == "ok", check
    assert "saw NVIDIA RTX A6000" in check["detail"]
    assert kubectl.calls()[-1][:2] == ["delete", "pod"]
    replay = cli("doctor", "--json", "--facts", str(facts), "--config", config)
    assert gpu_pod_check(replay.stdout) == check
    recorded = json.loads(facts.read_text())["gpu_pod"]
    assert recorded["manifest"] == kubectl.created()
    assert recorded["commands"]["logs"]["stdout"].startswith("GPU 0: NVIDIA RTX A6000 (UUID: GPU-")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--gpu-pod", "--facts", "x.json"], "--facts judges recorded facts"),
        (["--gpu-pod-timeout", "30"], "add --gpu-pod"),
        (["--gpu-pod", "--gpu-pod-timeout", "0"], "between 1 and 3600"),
    ],
)
def test_gpu_pod_usage_errors(cli, args: list[str], says: str) -> None:
    result = cli("doctor", *args)
    assert result.exit_code == 2
    assert says in result.stderr


def test_sigterm_mid_wait_deletes_the_pod(kubectl: Kubectl, tmp_path: Path, hermetic) -> None:
    """`kill <doctor>` while it waits for a pod stuck pulling: the pod is deleted, doctor
    reports the check as failed (interrupted) and exits within seconds."""
    kubectl.case("still-pulling")
    config = box_config_file(tmp_path, hermetic.endpoint)
    env = hermetic.subprocess_env(PATH=f"{kubectl.bin_dir}:{os.environ.get('PATH', '/usr/bin')}")
    argv = [sys.executable, "-m", "deskgpu", "doctor", "--gpu-pod", "--gpu-pod-timeout", "120",
            "--json", "--config", str(config)]  # fmt: skip
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while not any(c[:2] == ["get", "pod"] for c in kubectl.calls()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "doctor never looked at its pod"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 3, err
    check = gpu_pod_check(out)
    assert check["status"] == "fail"
    assert check["detail"].startswith("interrupted by SIGTERM")
    name = kubectl.created()["metadata"]["name"]
    last = kubectl.calls()[-1]
    assert last[:3] == ["delete", "pod", name]
    assert "Traceback" not in err
