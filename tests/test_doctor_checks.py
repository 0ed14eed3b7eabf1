"""Doctor's checks over the host facts in tests/fixtures/doctor/*.json.

One file was recorded live (`deskgpu doctor --record` on the no-GPU dev VM); the others were
built by hand in the format `--record` writes, to stand for boxes not at hand. Each file's
`_provenance` says which, and from what.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import pytest

from deskgpu.config import SYSTEM_CONFIG, HostConfig, load_config
from deskgpu.doctor.checks import (
    FAIL,
    OK,
    SKIP,
    WARN,
    Check,
    drift_distributions,
    gpu_matches,
    resolve_endpoint,
    run_checks,
)
from deskgpu.doctor.facts import FactsFormatError, HostFacts, PathFact
from deskgpu.doctor.report import run_doctor
from deskgpu.errors import ExitStatus

FIXTURES = Path(__file__).parent / "fixtures" / "doctor"
BOX_CONFIG = FIXTURES / "host-config.yaml"


def facts(name: str) -> HostFacts:
    return HostFacts.from_dict(json.loads((FIXTURES / name).read_text()))


def box_config(**changes: object) -> HostConfig:
    """The fixtures' box config, as installed there (/etc/deskgpu/config.yaml: the file its
    API server's guard enforces in the recorded `sky.guard` answers)."""
    changes.setdefault("source", str(SYSTEM_CONFIG))
    return dataclasses.replace(load_config(BOX_CONFIG), **changes)  # type: ignore[arg-type]


def by_id(checks: list[Check]) -> dict[str, Check]:
    return {c.id: c for c in checks}


def not_ok(checks: list[Check]) -> dict[str, str]:
    return {c.id: c.status for c in checks if c.status not in (OK, SKIP)}


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.json")))
def test_recorded_facts_round_trip(name: str) -> None:
    doc = json.loads((FIXTURES / name).read_text())
    assert doc.pop("_provenance")  # the fixture's own note, not a fact: every file has one
    assert HostFacts.from_dict(doc).to_dict() == doc


def test_healthy_4x_a6000_box_is_all_ok() -> None:
    result = run_doctor(box_config(), facts("healthy-4x-a6000.json"), source="recorded")
    assert not_ok(result.checks) == {}
    assert result.exit_status == ExitStatus.OK
    checks = by_id(result.checks)
    assert checks["driver.gpus"].detail.startswith("4x NVIDIA RTX A6000")
    assert "driver 550.90.07, supports CUDA 12.4" in checks["driver.nvml"].detail
    assert "1.16.2" in checks["docker.toolkit"].detail
    assert "deskbox: 4" in checks["kubernetes.gpu_allocatable"].detail
    assert "deskgpu.policy.HouseRules" in checks["skypilot.admin_policy"].detail
    assert "/etc/systemd/system/deskgpu-reap.service" in checks["operations.reap_scheduled"].detail
    assert checks["operations.observe_fresh"].detail.startswith("newest observation 2m 10s ago")
    assert checks["skypilot.kueue"].status == SKIP  # not configured on this box
    assert all(c.fix is None for c in result.checks)


def test_torch_pip_installed_into_system_python_warns_with_what_and_where() -> None:
    checks = run_checks(facts("system-pip-torch.json"), box_config())
    assert not_ok(checks) == {"golden_rule.host_python": WARN}
    check = by_id(checks)["golden_rule.host_python"]
    assert check.detail.startswith("torch 2.3.1, triton 2.3.1, nvidia_cublas_cu12 12.1.3.1")
    assert "/usr/local/lib/python3.10/dist-packages" in check.detail
    assert check.fix is not None
    assert "pip uninstall -y torch triton nvidia-cublas-cu12" in check.fix


def test_missing_container_toolkit_fails_docker_and_kubernetes_gpus() -> None:
    checks = run_checks(facts("missing-container-toolkit.json"), box_config())
    assert not_ok(checks) == {
        "docker.nvidia_runtime": FAIL,
        "docker.toolkit": FAIL,
        "kubernetes.gpu_allocatable": FAIL,
        "kubernetes.device_plugin": FAIL,
        "kubernetes.gpu_labels": WARN,
    }
    found = by_id(checks)
    assert "nvidia-ctk runtime configure --runtime=docker" in (
        found["docker.nvidia_runtime"].fix or ""
    )
    assert "container-toolkit" in (found["docker.toolkit"].fix or "")
    assert "0/1 ready" in found["kubernetes.device_plugin"].detail


def test_k3s_node_without_nvidia_gpu_resource() -> None:
    checks = run_checks(facts("k3s-node-without-gpus.json"), box_config())
    assert not_ok(checks) == {
        "kubernetes.gpu_allocatable": FAIL,
        "kubernetes.device_plugin": FAIL,
        "kubernetes.gpu_labels": WARN,
    }
    found = by_id(checks)
    assert "no node advertises nvidia.com/gpu" in found["kubernetes.gpu_allocatable"].detail
    assert "kubectl label node deskbox skypilot.co/accelerator=a6000" in (
        found["kubernetes.gpu_labels"].fix or ""
    )


def test_thermally_throttling_gpu_fails_and_names_it() -> None:
    result = run_doctor(box_config(), facts("thermal-throttling.json"))
    assert not_ok(result.checks) == {"driver.thermal": FAIL}
    detail = by_id(result.checks)["driver.thermal"].detail
    assert "GPU 2 at 93C: thermal slowdown in 3/3 samples" in detail
    assert "GPU 1 at 85C" in detail  # at the configured limit, not yet throttling
    assert result.exit_status == ExitStatus.FOUND


def test_one_thermal_sample_is_a_warning_not_a_failure() -> None:
    recorded = facts("thermal-throttling.json")
    recorded.nvml.gpus[2].samples[1].clocks_event_reasons = 0x4
    recorded.nvml.gpus[2].samples[2].clocks_event_reasons = 0x0
    check = by_id(run_checks(recorded, box_config()))["driver.thermal"]
    assert check.status == WARN
    assert "1/3 samples" in check.detail


def test_per_user_private_sky_server_is_a_failure() -> None:
    # alice's box: no shared endpoint anywhere, her SDK auto-started its own server.
    checks = run_checks(facts("private-sky-server.json"), box_config(api_server=None))
    found = by_id(checks)
    assert found["skypilot.endpoint"].status == FAIL
    shared = found["skypilot.shared_server"]
    assert shared.status == FAIL
    assert "alice's private one (pid 48211, no --deploy" in shared.detail
    assert "sky api stop" in (shared.fix or "")
    assert found["skypilot.infra"].status == FAIL
    assert found["skypilot.admin_policy"].status == WARN  # her server has no config to read


def test_shared_server_run_by_the_wrong_account() -> None:
    recorded = facts("healthy-4x-a6000.json")
    recorded.sky.processes[0].user = "bob"
    recorded.sky.processes[0].uid = 1002
    check = by_id(run_checks(recorded, box_config()))["skypilot.shared_server"]
    assert check.status == FAIL
    assert "doctor.api_server_user is skypilot" in check.detail


def test_stray_private_server_next_to_the_shared_one_warns() -> None:
    recorded = facts("healthy-4x-a6000.json")
    stray = dataclasses.replace(recorded.sky.processes[0], pid=5151, uid=1003, user="carol")
    stray.port, stray.deploy = 46581, False
    recorded.sky.processes.append(stray)
    check = by_id(run_checks(recorded, box_config()))["skypilot.shared_server"]
    assert check.status == WARN
    assert "carol (pid 5151, port 46581)" in check.detail


def test_endpoint_env_overriding_the_box_server_warns() -> None:
    recorded = facts("healthy-4x-a6000.json")
    recorded.env["SKYPILOT_API_SERVER_ENDPOINT"] = "http://10.0.0.9:46580"
    check = by_id(run_checks(recorded, box_config()))["skypilot.endpoint"]
    assert check.status == WARN
    assert check.fix == "`export SKYPILOT_API_SERVER_ENDPOINT=http://127.0.0.1:46580` (or unset it)"


def test_admin_policy_missing_when_required() -> None:
    recorded = facts("healthy-4x-a6000.json")
    recorded.sky.server_configs[0].text = "kubernetes:\n  provision_timeout: -1\n"
    check = by_id(run_checks(recorded, box_config()))["skypilot.admin_policy"]
    assert check.status == FAIL
    assert "/var/lib/skypilot/.sky/config.yaml" in (check.fix or "")
    relaxed = box_config(doctor={"require_admin_policy": False})
    assert by_id(run_checks(recorded, relaxed))["skypilot.admin_policy"].status == SKIP


def test_gpu_count_below_inventory_fails() -> None:
    recorded = facts("healthy-4x-a6000.json")
    del recorded.nvml.gpus[3]
    found = by_id(run_checks(recorded, box_config()))
    assert found["driver.gpus"].status == FAIL
    assert "3x A6000 (config says 4)" in found["driver.gpus"].detail
    # k8s still advertises 4 while NVML sees 3.
    assert found["kubernetes.gpu_allocatable"].status == FAIL


def test_gpu_fell_off_the_bus() -> None:
    recorded = facts("healthy-4x-a6000.json")
    recorded.nvml.gpus[1].error = "GPU is lost (fell off the bus?)"
    check = by_id(run_checks(recorded, box_config()))["driver.gpus"]
    assert check.status == FAIL
    assert check.detail.startswith("GPU 1: GPU is lost")


def test_remapped_row_failure_and_pending_retirement() -> None:
    recorded = facts("healthy-4x-a6000.json")
    recorded.nvml.gpus[0].remapped_rows_pending = True
    assert by_id(run_checks(recorded, box_config()))["driver.ecc"].status == WARN
    recorded.nvml.gpus[0].remapped_rows_failure = True
    check = by_id(run_checks(recorded, box_config()))["driver.ecc"]
    assert check.status == FAIL
    assert "GPU 0: row remapping failed" in check.detail


def test_persistence_mode_off_warns() -> None:
    recorded = facts("healthy-4x-a6000.json")
    recorded.nvml.gpus[2].persistence_mode = False
    check = by_id(run_checks(recorded, box_config()))["driver.persistence"]
    assert check.status == WARN
    assert "nvidia-persistenced" in (check.fix or "")


def test_low_disk_space_thresholds() -> None:
    recorded = facts("healthy-4x-a6000.json")
    ckpt = recorded.storage["checkpoints"]
    ckpt.free_bytes = int(ckpt.total_bytes * 0.10)  # type: ignore[operator]
    assert by_id(run_checks(recorded, box_config()))["storage.free_space"].status == WARN
    ckpt.free_bytes = int(ckpt.total_bytes * 0.02)  # type: ignore[operator]
    check = by_id(run_checks(recorded, box_config()))["storage.free_space"]
    assert check.status == FAIL
    assert "/checkpoints" in (check.fix or "")


def test_checkpoints_on_nfs_and_root_owned() -> None:
    recorded = facts("healthy-4x-a6000.json")
    recorded.storage["checkpoints"] = PathFact(
        path="/checkpoints",
        exists=True,
        is_dir=True,
        mode=0o755,
        owner="root",
        group="root",
        free_bytes=10**12,
        total_bytes=2 * 10**12,
        mount_point="/checkpoints",
        fstype="nfs4",
        mount_source="nas:/export/ckpt",
    )
    found = by_id(run_checks(recorded, box_config()))
    assert found["storage.local_disk"].status == WARN
    assert "nas:/export/ckpt (nfs4)" in found["storage.local_disk"].detail
    assert found["storage.checkpoints"].status == OK


@pytest.mark.parametrize(
    ("mode", "owner", "who"),
    [(0o2775, "root", "group research"), (0o1777, "root", "everyone"), (0o755, "alice", "alice")],
)
def test_checkpoint_root_anyone_but_root_can_write_fails(mode: int, owner: str, who: str) -> None:
    """A writable root lets a user plant `ln -s / /checkpoints/<user>` (review finding C3)."""
    recorded = facts("healthy-4x-a6000.json")
    old = recorded.storage["checkpoints"]
    recorded.storage["checkpoints"] = replace(old, mode=mode, owner=owner, group="research")
    check = by_id(run_checks(recorded, box_config()))["storage.checkpoints"]
    assert check.status == FAIL
    assert who in check.detail and "symlink" in check.detail
    assert check.fix.startswith(
        "`sudo chown root:root /checkpoints && sudo chmod 0755 /checkpoints`"
    )


def test_schedule_by_a_systemd_timer_counts_only_while_the_timer_is_active() -> None:
    recorded = facts("healthy-4x-a6000.json")  # the rendered timers, listed as active
    assert by_id(run_checks(recorded, box_config()))["operations.reap_scheduled"].status == OK
    timers = recorded.commands["systemctl_timers"]
    listed = timers.stdout
    timers.stdout = "".join(line for line in listed.splitlines(True) if "deskgpu-reap" not in line)
    found = by_id(run_checks(recorded, box_config()))
    check = found["operations.reap_scheduled"]
    assert check.status == FAIL  # the unit exists, but systemd does not list the timer
    assert "deskgpu-reap.timer is not active" in check.detail
    assert check.fix == "`sudo systemctl enable --now deskgpu-reap.timer`"
    assert found["operations.reap_ran"].status == SKIP  # needs the schedule
    assert found["operations.observe_scheduled"].status == OK
    timers.stdout = listed
    assert by_id(run_checks(recorded, box_config()))["operations.reap_scheduled"].status == OK


def test_skip_list_in_host_config() -> None:
    checks = run_checks(
        facts("thermal-throttling.json"), box_config(doctor={"skip": ["driver.thermal"]})
    )
    check = by_id(checks)["driver.thermal"]
    assert (check.status, check.fix) == (SKIP, None)


def test_docker_socket_permission_denied_is_a_skip_not_a_failure() -> None:
    recorded = facts("healthy-4x-a6000.json")
    info = recorded.commands["docker_info"]
    info.returncode, info.stdout = (
        1,
        '{"ServerVersion":"","Runtimes":null,"DefaultRuntime":"","CDISpecDirs":null}\n',
    )
    info.stderr = (
        "permission denied while trying to connect to the Docker daemon socket at "
        'unix:///var/run/docker.sock: Get "http://%2Fvar%2Frun%2Fdocker.sock/v1.46/info": dial '
        "unix /var/run/docker.sock: connect: permission denied\n"
    )
    found = by_id(run_checks(recorded, box_config()))
    assert found["docker.daemon"].status == SKIP
    assert "sudo deskgpu doctor" in found["docker.daemon"].detail
    assert found["docker.nvidia_runtime"].status == OK  # daemon.json + CDI spec still say so


def test_hung_kube_api() -> None:
    recorded = facts("healthy-4x-a6000.json")
    nodes = recorded.commands["kube_nodes"]
    nodes.returncode, nodes.stdout, nodes.timed_out, nodes.elapsed_s = None, "", True, 4.0
    del recorded.commands["kube_daemonsets"]
    found = by_id(run_checks(recorded, box_config()))
    assert found["kubernetes.nodes"].status == FAIL
    assert "did not answer" in found["kubernetes.nodes"].detail
    assert found["kubernetes.gpu_allocatable"].status == SKIP


def test_kueue_configured_but_not_installed() -> None:
    from deskgpu.doctor.facts import CommandResult

    recorded = facts("healthy-4x-a6000.json")
    recorded.commands["kube_localqueues"] = CommandResult(
        argv=["kubectl", "get", "localqueues.kueue.x-k8s.io", "-A", "-o", "json"],
        returncode=1,
        stderr='error: the server doesn\'t have a resource type "localqueues"\n',
    )
    check = by_id(run_checks(recorded, box_config(kueue_local_queue="deskgpu")))["skypilot.kueue"]
    assert check.status == FAIL
    assert "Kueue is not installed" in check.detail


@pytest.mark.parametrize(
    ("model", "name", "expected"),
    [
        ("A6000", "NVIDIA RTX A6000", True),
        ("H100", "NVIDIA H100 80GB HBM3", True),
        ("A100-80GB", "NVIDIA A100-SXM4-80GB", True),
        ("RTX4090", "NVIDIA GeForce RTX 4090", True),
        ("A100", "NVIDIA A10", False),
        ("A6000", "NVIDIA RTX 6000 Ada Generation", False),
    ],
)
def test_gpu_model_matching(model: str, name: str, expected: bool) -> None:
    assert gpu_matches(model, name) is expected


def test_drift_ignores_nvml_bindings_and_plain_libraries() -> None:
    dists = [
        "nvidia-ml-py==12.560.30",
        "numpy==1.26.4",
        "requests==2.31.0",
        "jax==0.4.30",
        "nvidia_cudnn_cu12==9.1.0.70",
        "tensorflow-gpu==2.12.0",
    ]
    assert drift_distributions(dists) == [
        "jax==0.4.30",
        "tensorflow-gpu==2.12.0",
        "nvidia_cudnn_cu12==9.1.0.70",
    ]


def test_endpoint_resolution_order() -> None:
    sky_yaml = "api_server:\n  endpoint: http://box:46580\n"
    cfg = HostConfig(api_server="http://127.0.0.1:46580")
    env = {"SKYPILOT_API_SERVER_ENDPOINT": "http://other:1"}
    assert resolve_endpoint(env, cfg, sky_yaml) == (
        "http://other:1",
        "env SKYPILOT_API_SERVER_ENDPOINT",
    )
    assert resolve_endpoint({}, cfg, sky_yaml)[1] == "host config api_server"
    assert resolve_endpoint({}, HostConfig(), sky_yaml) == (
        "http://box:46580",
        "~/.sky/config.yaml api_server.endpoint",
    )
    assert resolve_endpoint({}, HostConfig(), "not: [yaml") == ("http://127.0.0.1:46580", "default")


def test_newer_recorder_version_is_refused() -> None:
    doc = json.loads((FIXTURES / "healthy-4x-a6000.json").read_text())
    doc["facts_version"] = 99
    with pytest.raises(FactsFormatError, match="facts_version 99"):
        HostFacts.from_dict(doc)


def test_every_check_has_a_fix_when_not_ok() -> None:
    for name in FIXTURES.glob("*.json"):
        for check in run_checks(facts(name.name), box_config(api_server=None)):
            if check.status in (WARN, FAIL):
                assert check.fix, check.id
            assert "\n" not in check.detail, check.id


# ---------------------------------------------------------------------------------------------
# skypilot.hardening: the running server has deskgpu's guard (tests/test_hardening_server.py
# runs the same check against a real server with and without it)

GUARD_URL = "http://127.0.0.1:46580/plugins/api/deskgpu/guard"


def _with_guard(status: int | None, body: object = None, error: str | None = None) -> HostFacts:
    from deskgpu.doctor.facts import HttpFact

    recorded = facts("healthy-4x-a6000.json")
    text = body if isinstance(body, str) or body is None else json.dumps(body)
    recorded.sky.guard = HttpFact(GUARD_URL, status_code=status, body=text, error=error)
    return recorded


def _active(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "guard": "active",
        "admin_policy": "deskgpu.policy.HouseRules",
        "host_config": str(SYSTEM_CONFIG),
        "host_config_error": None,
        "identity": "bound to the connecting Unix account",
        "trusted_frontends": [],
        "trusted_frontends_problems": [],
    }
    doc.update(changes)
    return doc


def _hardening(recorded: HostFacts, config: HostConfig | None = None) -> Check:
    return by_id(run_checks(recorded, config or box_config()))["skypilot.hardening"]


def test_a_server_without_the_guard_fails_hardening() -> None:
    check = _hardening(_with_guard(404, '{"detail":"Not Found"}', "HTTP 404 Not Found"))
    assert check.status == FAIL
    assert "switch the house rules off" in check.detail
    assert "plugins.yaml" in check.fix and "systemctl restart skypilot-api" in check.fix


def test_the_guard_is_not_required_without_the_policy() -> None:
    relaxed = box_config(doctor={"require_admin_policy": False})
    assert _hardening(_with_guard(404, "{}"), relaxed).status == SKIP


def test_an_active_guard_is_ok_and_says_what_it_pins() -> None:
    check = _hardening(_with_guard(200, _active()))
    assert check.status == OK
    assert "deskgpu.policy.HouseRules" in check.detail and str(SYSTEM_CONFIG) in check.detail


def test_a_guard_pinning_another_policy_fails() -> None:
    check = _hardening(_with_guard(200, _active(admin_policy="lab.Permissive")))
    assert check.status == FAIL and "lab.Permissive" in check.detail


def test_a_guard_enforcing_another_host_config_warns() -> None:
    check = _hardening(_with_guard(200, _active(host_config="/srv/other.yaml")))
    assert check.status == WARN
    assert "/srv/other.yaml" in check.detail and "--config /srv/other.yaml" in check.fix


def test_a_guard_without_its_host_config_fails_and_says_why() -> None:
    missing = f"the box's deskgpu host config {SYSTEM_CONFIG} is missing, ..."
    check = _hardening(_with_guard(200, _active(host_config_error=missing)))
    assert check.status == FAIL and "refuses every request" in check.detail
    assert str(SYSTEM_CONFIG) in check.detail and "empty file" in check.fix


def test_an_older_guard_that_believes_the_client_fails() -> None:
    older = {k: v for k, v in _active().items() if k in ("guard", "admin_policy", "host_config")}
    check = _hardening(_with_guard(200, older))
    assert check.status == FAIL and "submit as another" in check.detail


def test_the_trusted_frontends_are_shown_and_a_wrong_one_warns() -> None:
    check = _hardening(_with_guard(200, _active(trusted_frontends=["transformerlab"])))
    assert check.status == OK and "transformerlab" in check.detail
    wrong = _active(trusted_frontends=["tl"], trusted_frontends_problems=["tl: no such account"])
    check = _hardening(_with_guard(200, wrong))
    assert check.status == WARN and "tl: no such account" in check.detail


def test_a_frontend_client_the_server_does_not_accept_warns() -> None:
    """The range is SkyPilot's own, as the guard reads it (sky/server/constants.py)."""
    server = {"api_version": 62, "min_compatible_api_version": 24}
    ok = {"transformerlab": {"api_version": "48", "version": "0.12.1"}}
    check = _hardening(
        _with_guard(
            200,
            _active(trusted_frontends=["transformerlab"], frontend_clients=ok, server_api=server),
        )
    )
    assert check.status == OK
    old = {"transformerlab": {"api_version": "20", "version": "0.9.3"}}
    check = _hardening(
        _with_guard(
            200,
            _active(trusted_frontends=["transformerlab"], frontend_clients=old, server_api=server),
        )
    )
    assert check.status == WARN
    assert (
        "transformerlab's SkyPilot client 0.9.3 speaks API version 20, outside 24..62"
        in check.detail
    )
    assert "docs/transformerlab.md" in check.fix


@pytest.mark.parametrize("body", ["not json", '{"guard": "inactive"}', "[]"])
def test_a_guard_answer_that_is_not_active_fails(body: str) -> None:
    assert _hardening(_with_guard(200, body)).status == FAIL


def test_no_server_no_hardening_verdict() -> None:
    recorded = facts("dev-vm-no-gpu.json")
    assert _hardening(recorded).status == SKIP


def test_doctor_and_the_plugin_name_the_same_route() -> None:
    pytest.importorskip("sky")
    from deskgpu import policy
    from deskgpu.doctor import probes
    from deskgpu.setup import render

    assert probes.GUARD_ROUTE == policy.GUARD_ROUTE
    assert f"{policy.Guard.__module__}.{policy.Guard.__qualname__}" == render.GUARD_CLASS
    assert render.POLICY_CLASS == policy.POLICY_CLASS


def test_no_fix_suggests_a_server_bound_to_every_interface(
    tmp_path: Path, installed_tools: list[str]
) -> None:
    """`sky api start --deploy` binds 0.0.0.0; the fixes point at the rendered unit, whose
    render command is one the real CLI runs."""
    from typer.testing import CliRunner

    from deskgpu.cli import app
    from deskgpu.doctor.checks import SHARED_SERVER

    fixes = [
        c.fix or ""
        for name in sorted(p.name for p in FIXTURES.glob("*.json"))
        for c in run_checks(facts(name), box_config())
    ]
    assert any(SHARED_SERVER in fix for fix in fixes)
    assert not any("sky api start" in fix for fix in fixes)
    out = tmp_path / "box"
    rendered = CliRunner().invoke(
        app, ["setup", "render", "--out", str(out), "--config", str(BOX_CONFIG), *installed_tools]
    )
    assert rendered.exit_code == 0, rendered.stderr
    unit = (out / "etc/systemd/system/skypilot-api.service").read_text()
    assert "--host 127.0.0.1" in unit and (out / "install.sh").exists()


# -- what the cluster enforces by itself (issue #12) ------------------------------------------


def test_the_jobs_identity_and_admission_policies_are_ok_on_the_healthy_box() -> None:
    found = by_id(run_checks(facts("healthy-4x-a6000.json"), box_config()))
    assert found["kubernetes.job_identity"].status == OK
    assert "default/deskgpu-job exists and may not create pods" in (
        found["kubernetes.job_identity"].detail
    )
    assert found["kubernetes.admission"].status == OK
    assert "deskgpu-job-pods, deskgpu-job-deletes" in found["kubernetes.admission"].detail


def test_jobs_service_account_missing_fails() -> None:
    recorded = facts("healthy-4x-a6000.json")
    account = recorded.commands["kube_job_account"]
    account.returncode, account.stdout = 1, ""
    account.stderr = 'Error from server (NotFound): serviceaccounts "deskgpu-job" not found\n'
    check = by_id(run_checks(recorded, box_config()))["kubernetes.job_identity"]
    assert check.status == FAIL and "does not exist" in check.detail
    assert check.fix and "kube/deskgpu-job.yaml" in check.fix


def test_jobs_service_account_that_may_create_pods_fails() -> None:
    """E.g. someone bound it to SkyPilot's all-verbs Role, or to cluster-admin."""
    recorded = facts("healthy-4x-a6000.json")
    can_i = recorded.commands["kube_job_can_create_pods"]
    can_i.returncode, can_i.stdout = 0, "yes\n"
    check = by_id(run_checks(recorded, box_config()))["kubernetes.job_identity"]
    assert check.status == FAIL and "may create pods" in check.detail
    assert check.fix and "clusterrolebindings" in check.fix


def test_impersonation_refused_is_a_skip_not_a_pass() -> None:
    recorded = facts("healthy-4x-a6000.json")
    can_i = recorded.commands["kube_job_can_create_pods"]
    can_i.returncode, can_i.stdout = 1, ""
    can_i.stderr = (
        'Error from server (Forbidden): users "system:serviceaccount:default:deskgpu-job" is '
        'forbidden: User "alice" cannot impersonate resource "users" in API group "" at the '
        "cluster scope\n"
    )
    check = by_id(run_checks(recorded, box_config()))["kubernetes.job_identity"]
    assert check.status == SKIP and "cannot impersonate" in check.detail


def _admission_items(recorded: HostFacts) -> list[dict]:
    return json.loads(recorded.commands["kube_admission"].stdout)["items"]


@pytest.mark.parametrize(
    ("drop", "said"),
    [
        (("ValidatingAdmissionPolicy", "deskgpu-job-pods"), "missing policy deskgpu-job-pods"),
        (
            ("ValidatingAdmissionPolicyBinding", "deskgpu-job-deletes"),
            "missing a Deny binding of deskgpu-job-deletes",
        ),
    ],
)
def test_admission_policy_or_binding_missing_fails(drop, said) -> None:
    recorded = facts("healthy-4x-a6000.json")
    items = [i for i in _admission_items(recorded) if (i["kind"], i["metadata"]["name"]) != drop]
    recorded.commands["kube_admission"].stdout = json.dumps({"kind": "List", "items": items})
    check = by_id(run_checks(recorded, box_config()))["kubernetes.admission"]
    assert check.status == FAIL and said in check.detail
    assert check.fix and "kube/deskgpu-admission.yaml" in check.fix


def test_a_binding_that_only_warns_does_not_count() -> None:
    recorded = facts("healthy-4x-a6000.json")
    items = _admission_items(recorded)
    for item in items:
        if item["kind"] == "ValidatingAdmissionPolicyBinding":
            item["spec"]["validationActions"] = ["Warn", "Audit"]
    recorded.commands["kube_admission"].stdout = json.dumps({"kind": "List", "items": items})
    check = by_id(run_checks(recorded, box_config()))["kubernetes.admission"]
    assert check.status == FAIL and "a Deny binding of deskgpu-job-pods" in check.detail


def test_a_kubernetes_without_validating_admission_policies_fails() -> None:
    recorded = facts("healthy-4x-a6000.json")
    cmd = recorded.commands["kube_admission"]
    cmd.returncode, cmd.stdout = 1, ""
    cmd.stderr = 'error: the server doesn\'t have a resource type "validatingadmissionpolicy"\n'
    check = by_id(run_checks(recorded, box_config()))["kubernetes.admission"]
    assert check.status == FAIL and "serves no ValidatingAdmissionPolicy" in check.detail
    assert check.fix and "1.30" in check.fix


def test_cluster_enforcement_checks_skip_without_nodes() -> None:
    recorded = facts("healthy-4x-a6000.json")
    nodes = recorded.commands["kube_nodes"]
    nodes.returncode, nodes.stdout, nodes.timed_out, nodes.elapsed_s = None, "", True, 4.0
    for key in ("kube_daemonsets", "kube_job_account", "kube_job_can_create_pods"):
        del recorded.commands[key]
    del recorded.commands["kube_admission"]
    found = by_id(run_checks(recorded, box_config()))
    for cid in ("kubernetes.job_identity", "kubernetes.admission"):
        assert found[cid].status == SKIP and "kubernetes.nodes" in found[cid].detail
