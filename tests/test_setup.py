"""`deskgpu setup render`: every generated file parses, and SkyPilot, systemd, cron, Kueue and
`deskgpu doctor` would each accept it. Driven through the real CLI."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from deskgpu.config import HostConfig, load_config
from deskgpu.doctor.facts import FileFact
from deskgpu.doctor.schedules import find_scheduled, parse_args
from deskgpu.setup.render import POLICY_CLASS, Tools, kueue_objects, render
from deskgpu.setup.schedules import SCHEDULES
from tests.conftest import HOST_CONFIG

TOOLS = ["--python", "/opt/deskgpu/bin/python", "--deskgpu", "/opt/deskgpu/bin/deskgpu"]
_DNS = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@pytest.fixture
def rendered(cli, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    out = tmp_path / "box"
    result = cli(
        "setup", "render", "--out", str(out), "--json", "--config", str(HOST_CONFIG), *TOOLS
    )
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)


def _unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def _exec_start(path: Path) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in path.read_text().splitlines()
        if line.startswith("ExecStart=")
    ]


def test_every_listed_file_is_written_with_its_mode(rendered) -> None:
    out, doc = rendered
    paths = {f["path"] for f in doc["files"]}
    assert {
        "etc/systemd/system/skypilot-api.service",
        "var/lib/skypilot/.sky/config.yaml",
        "etc/profile.d/skypilot.sh",
        "kueue/lab-a6000.yaml",
        "etc/tmpfiles.d/deskgpu.conf",
        "etc/systemd/system/deskgpu-reap.timer",
        "etc/systemd/system/deskgpu-observe.timer",
        "cron/deskgpu",
        "install.sh",
    } <= paths
    for f in doc["files"]:
        target = out / f["path"]
        assert target.is_file(), f
        assert oct(target.stat().st_mode & 0o777)[2:].zfill(4) == f["mode"]


def test_every_yaml_file_parses(rendered) -> None:
    out, doc = rendered
    for f in doc["files"]:
        if f["path"].endswith((".yaml", ".yml")):
            assert list(yaml.safe_load_all((out / f["path"]).read_text())), f["path"]


def test_server_config_passes_skypilots_own_config_loader(rendered) -> None:
    from sky import skypilot_config
    from sky.utils import admin_policy_utils, common_utils, schemas

    out, _ = rendered
    path = out / "var/lib/skypilot/.sky/config.yaml"
    loaded = skypilot_config.parse_and_validate_config_file(str(path))
    common_utils.validate_schema(dict(loaded), schemas.get_config_schema(), "server config: ")
    assert loaded["admin_policy"] == POLICY_CLASS
    assert loaded["jobs"]["controller"]["consolidation_mode"] is True
    # The server imports the policy class exactly like this.
    policy = admin_policy_utils._get_policy_impl(loaded["admin_policy"])
    assert type(policy).__name__ == "HouseRules"


@pytest.mark.parametrize(
    ("infra", "key", "value"),
    [
        ("k8s/default", "kubernetes", {"allowed_contexts": ["default"]}),
        ("ssh/lab-box", "ssh", {"allowed_node_pools": ["lab-box"]}),
    ],
)
def test_server_config_limits_skypilot_to_the_box_infra(tmp_path, infra, key, value) -> None:
    from sky.utils import common_utils, schemas

    config = HostConfig(infra=infra, gpus={"A6000": 4})
    text = (
        render(config, Tools("/usr/bin/python3", "/usr/bin/deskgpu"))
        .by_path()["var/lib/skypilot/.sky/config.yaml"]
        .text
    )
    doc = yaml.safe_load(text)
    assert doc[key] == value
    common_utils.validate_schema(doc, schemas.get_config_schema(), "server config: ")


def test_api_server_unit_is_one_deploy_server_on_loopback(rendered) -> None:
    out, _ = rendered
    path = out / "etc/systemd/system/skypilot-api.service"
    unit = _unit(path)
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    assert unit["Service"]["User"] == "skypilot"
    (cmd,) = _exec_start(path)
    assert cmd.split()[:3] == ["/opt/deskgpu/bin/python", "-m", "sky.server.server"]
    assert "--deploy" in cmd.split() and "--host 127.0.0.1" in cmd and "--port 46580" in cmd
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_timers_and_services_parse_and_run_what_doctor_looks_for(rendered) -> None:
    out, _ = rendered
    for name, key, when in (
        ("reap", "OnCalendar", "Sun *-*-* 03:00:00"),
        ("observe", "OnUnitActiveSec", "5min"),
    ):
        timer = _unit(out / f"etc/systemd/system/deskgpu-{name}.timer")
        assert timer["Timer"][key] == when
        assert timer["Install"]["WantedBy"] == "timers.target"
        service = out / f"etc/systemd/system/deskgpu-{name}.service"
        assert _unit(service)["Service"]["Type"] == "oneshot"
        (cmd,) = _exec_start(service)
        (entry,) = find_scheduled({"systemd:x": FileFact(str(service), True, service.read_text())})
        schedule = next(s for s in SCHEDULES if s.key == name)
        assert parse_args(entry.args) == parse_args(schedule.args), cmd
        assert "SKYPILOT_DISABLE_LOCAL_API_SERVER=1" in service.read_text()


def test_cron_alternative_is_well_formed_and_matches_doctor(rendered) -> None:
    out, _ = rendered
    entries = [
        line
        for line in (out / "cron/deskgpu").read_text().splitlines()
        if line and not line.startswith("#") and not re.match(r"^[A-Z_]+=", line)
    ]
    assert len(entries) == 2
    for line in entries:
        fields = line.split(None, 6)
        assert len(fields) == 7 and fields[5] == "root"
    cron = out / "cron/deskgpu"
    found = find_scheduled(
        {"cron:/etc/cron.d/deskgpu": FileFact(str(cron), True, cron.read_text())}
    )
    assert [parse_args(e.args) for e in found] == [parse_args(s.args) for s in SCHEDULES]


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_profile_snippet_points_every_shell_at_the_shared_server(rendered) -> None:
    out, _ = rendered
    snippet = out / "etc/profile.d/skypilot.sh"
    shown = subprocess.run(
        [
            "sh",
            "-c",
            f'. "{snippet}"; '
            'echo "$SKYPILOT_API_SERVER_ENDPOINT $SKYPILOT_DISABLE_LOCAL_API_SERVER"',
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert shown.stdout.split() == ["http://127.0.0.1:46580", "1"]


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_install_script_is_valid_shell_and_installs_every_required_file(rendered) -> None:
    out, doc = rendered
    script = out / "install.sh"
    subprocess.run(["sh", "-n", str(script)], check=True)
    text = script.read_text()
    for f in doc["files"]:
        if f["optional"] or f["destination"] is None:
            continue
        assert f'"$here/{f["path"]}" {f["destination"]}' in text
    assert "systemctl enable --now skypilot-api.service" in text


def test_kueue_manifests_are_well_formed_kubernetes_objects(rendered) -> None:
    out, _ = rendered
    docs = list(yaml.safe_load_all((out / "kueue/lab-a6000.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["ResourceFlavor", "ClusterQueue", "LocalQueue"]
    for d in docs:
        assert d["apiVersion"] == "kueue.x-k8s.io/v1beta1"
        assert _DNS.match(d["metadata"]["name"]) and isinstance(d["spec"], dict)
    flavor, cluster_queue, local_queue = docs
    (group,) = cluster_queue["spec"]["resourceGroups"]
    assert cluster_queue["spec"]["queueingStrategy"] == "StrictFIFO"
    (used,) = group["flavors"]
    assert used["name"] == flavor["metadata"]["name"]
    covered = [r["name"] for r in used["resources"]]
    assert covered == group["coveredResources"]
    quota = {r["name"]: r["nominalQuota"] for r in used["resources"]}
    assert quota["nvidia.com/gpu"] == load_config(HOST_CONFIG).gpu_count == 4
    assert local_queue["spec"]["clusterQueue"] == cluster_queue["metadata"]["name"]
    assert local_queue["metadata"]["namespace"] == "default"


def test_the_gpu_count_appears_once_in_the_host_config_only(tmp_path) -> None:
    """Change the inventory and only Kueue's quota follows; nothing else carries the count."""
    tools = Tools("/usr/bin/python3", "/usr/bin/deskgpu")
    small = render(HostConfig(gpus={"A6000": 4}, kueue_local_queue="lab"), tools).by_path()
    big = render(HostConfig(gpus={"H100": 8, "L40S": 2}, kueue_local_queue="lab"), tools).by_path()
    changed = {p for p in small if small[p].text != big[p].text}
    assert changed == {"kueue/deskgpu.yaml"}
    (cq,) = [
        o
        for o in kueue_objects(HostConfig(gpus={"H100": 8, "L40S": 2}))
        if o["kind"] == "ClusterQueue"
    ]
    quota = cq["spec"]["resourceGroups"][0]["flavors"][0]["resources"][-1]
    assert quota == {"name": "nvidia.com/gpu", "nominalQuota": 10}


def test_layout_keeps_the_checkpoint_root_root_owned(tmp_path) -> None:
    """Nobody but root may create entries in the checkpoint root: a researcher who could
    would plant `<root>/<user>` as a symlink to `/` (review C3). Jobs enter it by subPath."""
    config = HostConfig(
        data_root="/srv/data", checkpoint_root="/srv/ckpt", doctor={"research_group": "research"}
    )
    text = render(config, Tools("/p", "/d")).by_path()["etc/tmpfiles.d/deskgpu.conf"].text
    lines = [line.split() for line in text.splitlines() if line.startswith("d ")]
    assert ["d", "/srv/data", "0755", "root", "root", "-"] in lines
    assert ["d", "/srv/ckpt", "0755", "root", "root", "-"] in lines
    assert not any("research" in line for line in lines)


def test_a_non_default_config_path_travels_to_every_service(cli, tmp_path) -> None:
    config = tmp_path / "deskgpu.yaml"
    config.write_text(
        textwrap.dedent(
            """\
            box_name: lab
            api_server: http://127.0.0.1:47000
            gpus: {A6000: 2}
            doctor: {api_server_user: svc-sky, skypilot_server_config: /srv/sky/.sky/config.yaml}
            """
        )
    )
    out = tmp_path / "out"
    result = cli("setup", "render", "--out", str(out), "--config", str(config), *TOOLS)
    assert result.exit_code == 0, result.stderr
    unit = _unit(out / "etc/systemd/system/skypilot-api.service")
    assert unit["Service"]["User"] == "svc-sky"
    assert unit["Service"]["WorkingDirectory"] == "/srv/sky"
    assert "--port 47000" in unit["Service"]["ExecStart"]
    assert (out / "srv/sky/.sky/config.yaml").is_file()
    for path in (
        "etc/systemd/system/skypilot-api.service",
        "etc/systemd/system/deskgpu-reap.service",
        "etc/profile.d/skypilot.sh",
        "cron/deskgpu",
    ):
        assert f"DESKGPU_CONFIG={config}" in (out / path).read_text(), path
    assert "review, then: sudo sh" in result.stdout


def test_remote_api_server_is_flagged(cli, tmp_path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("api_server: http://box.lab:46580\n")
    result = cli("setup", "render", "--out", str(tmp_path / "o"), "--config", str(config), *TOOLS)
    assert result.exit_code == 0
    assert "not on loopback" in result.stderr


def test_render_is_deterministic(cli, tmp_path) -> None:
    texts = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert (
            cli(
                "setup", "render", "--out", str(out), "--config", str(HOST_CONFIG), *TOOLS
            ).exit_code
            == 0
        )
        texts.append({p.relative_to(out): p.read_text() for p in out.rglob("*") if p.is_file()})
    assert texts[0] == texts[1]


EXAMPLE_SCHEDULES = {
    "examples/cron/deskgpu.crontab": "cron/deskgpu",
    "examples/systemd/deskgpu-observe.service": "etc/systemd/system/deskgpu-observe.service",
    "examples/systemd/deskgpu-observe.timer": "etc/systemd/system/deskgpu-observe.timer",
    "examples/systemd/deskgpu-reap.service": "etc/systemd/system/deskgpu-reap.service",
    "examples/systemd/deskgpu-reap.timer": "etc/systemd/system/deskgpu-reap.timer",
}


def example_schedules() -> dict[str, str]:
    """The schedule examples, as the generator renders them for the example host config."""
    import dataclasses

    config = dataclasses.replace(load_config(HOST_CONFIG), source="examples/host-config.yaml")
    files = render(config, Tools("python3", "/usr/local/bin/deskgpu")).by_path()
    return {example: files[path].text for example, path in EXAMPLE_SCHEDULES.items()}


@pytest.mark.parametrize("example", sorted(EXAMPLE_SCHEDULES))
def test_schedule_examples_are_the_generators_output(example: str) -> None:
    """One source: regenerate with `python -m tests.test_setup` after changing the generator."""
    from tests.conftest import ROOT

    assert (ROOT / example).read_text() == example_schedules()[example]


if __name__ == "__main__":
    from tests.conftest import ROOT

    for example, text in example_schedules().items():
        (ROOT / example).write_text(text)
        print(f"wrote {example}")
