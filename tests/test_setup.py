"""`deskgpu setup render`: every generated file parses, and SkyPilot, systemd, cron, Kueue,
shellcheck and `deskgpu doctor` would each accept it; the files name the host config they came
from and install it; the command refuses programs a box must not run. Driven through the real
CLI. `systemd-analyze` and `shellcheck` skip when absent (`.ci/run` installs both).
"""

from __future__ import annotations

import configparser
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from deskgpu.config import SYSTEM_CONFIG, HostConfig, load_config
from deskgpu.doctor.facts import FileFact
from deskgpu.doctor.scheduled import find_scheduled, parse_args
from deskgpu.setup.render import (
    K3S_KUBECONFIG,
    POLICY_CLASS,
    Tools,
    config_document,
    kueue_objects,
    render,
    write,
)
from deskgpu.setup.schedules import SCHEDULES
from tests.conftest import HOST_CONFIG, ROOT

_DNS = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
UNITS = "etc/systemd/system"


@pytest.fixture
def rendered(cli, tmp_path: Path, installed_tools: list[str]) -> tuple[Path, dict[str, Any]]:
    out = tmp_path / "box"
    result = cli(
        "setup", "render", "--out", str(out), "--json", "--config", str(HOST_CONFIG),
        *installed_tools,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)


def _real_tools() -> Tools:
    """Programs that exist here, so systemd-analyze can check the units' Exec lines."""
    deskgpu = Path(sys.executable).parent / "deskgpu"
    assert deskgpu.is_file(), "the venv's deskgpu script (uv sync installs it)"
    return Tools(python=sys.executable, deskgpu=str(deskgpu))


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
    assert doc[key] | value == doc[key]
    # Jobs run as the restricted identity, read under `kubernetes` for SSH node pools too.
    assert doc["kubernetes"]["remote_identity"] == "deskgpu-job"
    common_utils.validate_schema(doc, schemas.get_config_schema(), "server config: ")


def test_api_server_unit_is_one_deploy_server_on_loopback(rendered, installed_tools) -> None:
    out, _ = rendered
    path = out / "etc/systemd/system/skypilot-api.service"
    unit = _unit(path)
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    assert unit["Service"]["User"] == "skypilot"
    # SkyPilot's shutdown lock sits at a fixed /tmp path: a /tmp of its own, or any account
    # could own the lock first (an attacker review).
    assert unit["Service"]["PrivateTmp"] == "yes"
    (cmd,) = _exec_start(path)
    assert cmd.split()[:3] == [installed_tools[1], "-m", "sky.server.server"]
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
    assert re.search(r"^systemctl enable --now .*\bskypilot-api\.service\b", text, re.M)
    # The jobs' identity and the admission policy reach the cluster before the server starts.
    applied = [f["path"] for f in doc["files"] if f["apply"]]
    assert applied == [
        "kube/deskgpu-job.yaml",
        "kube/deskgpu-admission.yaml",
        "kube/nvidia-runtimeclass.yaml",
    ]
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("systemctl enable --now"))
    for path in applied:
        (at,) = [
            i for i, line in enumerate(lines) if line.endswith(f'kube apply -f "$here/{path}"')
        ]
        assert at < start
    assert "kubectl --kubeconfig /etc/rancher/k3s/k3s.yaml" in text
    assert "k3s kubectl --kubeconfig /etc/rancher/k3s/k3s.yaml" in text


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
    # The count only: the models name the node's GPU label in install.sh.
    big = render(HostConfig(gpus={"A6000": 10}, kueue_local_queue="lab"), tools).by_path()
    changed = {p for p in small if small[p].text != big[p].text}
    assert changed == {"kueue/deskgpu.yaml", "etc/deskgpu/config.yaml"}  # and the config itself
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


def test_the_config_that_was_read_is_named_and_installed(cli, tmp_path, installed_tools) -> None:
    """Headers name the file read (absolute, though --config was relative); that file, byte
    for byte, is installed as the system config, so no unit carries DESKGPU_CONFIG."""
    config = tmp_path / "deskgpu.yaml"
    config.write_bytes(
        textwrap.dedent(
            """\
            # the lab's box  \r
            box_name: lab
            api_server: http://127.0.0.1:47000
            gpus: {A6000: 2}
            doctor: {api_server_user: svc-sky, skypilot_server_config: /srv/sky/.sky/config.yaml}
            """
        ).encode()
    )
    out = tmp_path / "out"
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        result = cli(
            "setup", "render", "--out", "out", "--config", "deskgpu.yaml", *installed_tools
        )
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.stderr
    assert (out / "etc/deskgpu/config.yaml").read_bytes() == config.read_bytes()
    unit = _unit(out / "etc/systemd/system/skypilot-api.service")
    assert unit["Service"]["User"] == "svc-sky"
    assert unit["Service"]["WorkingDirectory"] == "/srv/sky"
    assert "--port 47000" in unit["Service"]["ExecStart"]
    assert (out / "srv/sky/.sky/config.yaml").is_file()
    header = f"Generated by `deskgpu setup render` from {config} (installed as {SYSTEM_CONFIG})."
    generated = [
        p
        for p in out.rglob("*")
        if p.is_file() and p != out / "etc/deskgpu/config.yaml" and p.suffix != ".csv"
    ]  # SkyPilot's catalog CSV has no comment syntax: its purpose names the inventory
    assert len(generated) >= 12
    for path in generated:
        text = path.read_text()
        assert header in text, path
        assert "DESKGPU_CONFIG" not in text, path
    assert f'"$here/etc/deskgpu/config.yaml" {SYSTEM_CONFIG}' in (out / "install.sh").read_text()
    assert "review, then: sudo sh" in result.stdout


def test_the_system_config_is_named_as_it_is(tmp_path) -> None:
    config = dataclasses.replace(load_config(HOST_CONFIG), source=str(SYSTEM_CONFIG))
    files = render(config, Tools("/p", "/d"), HOST_CONFIG.read_text()).by_path()
    assert f"from {SYSTEM_CONFIG}.\n" in files["etc/systemd/system/skypilot-api.service"].text
    assert "installed as" not in files["install.sh"].text


def test_built_in_defaults_are_written_out_for_the_admin_to_edit() -> None:
    """No host config anywhere: the files say so, and install.sh still installs a config,
    the defaults spelled out, that reads back as exactly the configuration they came from."""
    files = render(HostConfig(), Tools("/p", "/d")).by_path()
    assert "from built-in defaults (written out as /etc/deskgpu/config.yaml)" in (
        files["etc/systemd/system/skypilot-api.service"].text
    )
    written = files["etc/deskgpu/config.yaml"]
    assert "built-in defaults" in written.text and "gpus:" in written.text
    assert written.mode == 0o644 and written.destination == str(SYSTEM_CONFIG)
    assert yaml.safe_load(written.text)["data_root"] == "/data"


def test_a_config_written_out_reads_back_equal(tmp_path) -> None:
    for config in (
        HostConfig(),
        load_config(HOST_CONFIG),
        load_config(ROOT / "tests/fixtures/doctor/host-config.yaml"),
    ):
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config_document(config)))
        assert dataclasses.replace(load_config(path), source=config.source) == config


def test_cli_without_config_reads_deskgpu_config(cli, hermetic, tmp_path, installed_tools) -> None:
    out = tmp_path / "out"
    result = cli("setup", "render", "--out", str(out), "--json", *installed_tools)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["config"] == str(hermetic.host_config)
    assert (out / "etc/deskgpu/config.yaml").read_bytes() == hermetic.host_config.read_bytes()


def test_remote_api_server_is_flagged(cli, tmp_path, installed_tools) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("api_server: http://box.lab:46580\n")
    result = cli(
        "setup", "render", "--out", str(tmp_path / "o"), "--config", str(config),
        *installed_tools,
    )  # fmt: skip
    assert result.exit_code == 0
    assert "not on loopback" in result.stderr


def test_render_is_deterministic(cli, tmp_path, installed_tools) -> None:
    texts = []
    for name in ("a", "b"):
        out = tmp_path / name
        args = ["--out", str(out), "--config", str(HOST_CONFIG), *installed_tools]
        assert cli("setup", "render", *args).exit_code == 0
        texts.append({p.relative_to(out): p.read_text() for p in out.rglob("*") if p.is_file()})
    assert texts[0] == texts[1]


# ---------------------------------------------------------------------------------------------
# The programs the units run: the installed deskgpu's, never a source checkout's


def _program(path: Path, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)  # less the umask's bits
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return path


def _refused(result, *expected: str) -> None:
    assert result.exit_code == 2, result.stdout + result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()  # one line, with the fix
    for text in expected:
        assert text in line, line


def test_the_suites_own_venv_is_refused_as_the_default(cli, tmp_path) -> None:
    """In a source checkout the default interpreter is the checkout's .venv: services that
    ran it would change with every `git checkout` and `uv sync`."""
    out = tmp_path / "out"
    result = cli("setup", "render", "--out", str(out), "--config", str(HOST_CONFIG))
    _refused(
        result,
        f"--python {sys.executable} (the default",
        f"source checkout {ROOT}",
        "--python /opt/deskgpu/bin/python",
    )
    assert not out.exists()  # refused before writing anything


def test_the_checkouts_deskgpu_is_refused_even_beside_an_installed_python(
    cli, tmp_path, installed_tools
) -> None:
    deskgpu = Path(sys.executable).parent / "deskgpu"
    args = ["--python", installed_tools[1], "--deskgpu", str(deskgpu)]
    result = cli("setup", "render", "--out", str(tmp_path / "o"), *args)
    _refused(
        result, f"--deskgpu {deskgpu}", "source checkout", "--deskgpu /opt/deskgpu/bin/deskgpu"
    )


@pytest.mark.parametrize(
    ("layout", "why"),
    [
        ("missing", "is not an executable file"),
        ("not-executable", "is not an executable file"),
        ("directory", "is not an executable file"),
        ("relative", "must be an absolute path"),
        ("git-checkout", "source checkout"),
        ("deskgpu-source-tree", "source checkout"),
        ("symlink-into-checkout", "source checkout"),
    ],
)
def test_a_python_the_box_must_not_run_is_refused(cli, tmp_path, layout, why) -> None:
    if layout == "missing":
        python = str(tmp_path / "opt/deskgpu/bin/python")
    elif layout == "not-executable":
        python = str(_program(tmp_path / "bin/python", 0o644))
    elif layout == "directory":
        (tmp_path / "bin/python").mkdir(parents=True)
        python = str(tmp_path / "bin/python")
    elif layout == "relative":
        python = "python3"
    elif layout == "git-checkout":  # any project's working tree
        (tmp_path / "proj/.git").mkdir(parents=True)
        python = str(_program(tmp_path / "proj/.venv/bin/python"))
    elif layout == "deskgpu-source-tree":  # an unpacked sdist: no .git
        (tmp_path / "src").mkdir()
        (tmp_path / "src/pyproject.toml").write_text('[project]\nname = "deskgpu"\n')
        python = str(_program(tmp_path / "src/.venv/bin/python"))
    else:  # /usr/local/bin/python -> a checkout's venv
        (tmp_path / "proj/.git").mkdir(parents=True)
        target = _program(tmp_path / "proj/.venv/bin/python")
        (tmp_path / "usr/bin").mkdir(parents=True)
        (tmp_path / "usr/bin/python").symlink_to(target)
        python = str(tmp_path / "usr/bin/python")
    out = tmp_path / "out"
    result = cli("setup", "render", "--out", str(out), "--python", python, "--deskgpu", "/d")
    _refused(result, f"--python {python}:", why, "--python /opt/deskgpu/bin/python")
    assert not out.exists()


def test_a_project_named_otherwise_is_not_a_deskgpu_checkout(cli, tmp_path, world_tmp) -> None:
    """An install prefix may sit under some other project's pyproject.toml (no .git)."""
    (world_tmp / "pyproject.toml").write_text('[project]\nname = "deskgpu-site"\n')
    python = _program(world_tmp / "opt/bin/python")
    _program(world_tmp / "opt/bin/deskgpu")
    result = cli("setup", "render", "--out", str(tmp_path / "o"), "--python", str(python))
    assert result.exit_code == 0, result.stderr


def test_deskgpu_defaults_to_the_one_installed_beside_python(
    cli, tmp_path, installed_tools
) -> None:
    out = tmp_path / "out"
    python, deskgpu = installed_tools[1], installed_tools[3]
    result = cli("setup", "render", "--out", str(out), "--python", python)
    assert result.exit_code == 0, result.stderr
    (cmd,) = _exec_start(out / UNITS / "deskgpu-reap.service")
    assert cmd.split()[0] == deskgpu
    (cmd,) = _exec_start(out / UNITS / "skypilot-api.service")
    assert cmd.split()[0] == python


def test_no_deskgpu_beside_python_is_refused_with_the_fix(cli, tmp_path, world_tmp) -> None:
    python = _program(world_tmp / "opt/bin/python")
    result = cli("setup", "render", "--out", str(tmp_path / "o"), "--python", str(python))
    _refused(result, f"no deskgpu command next to {python}", "--deskgpu /opt/deskgpu/bin/deskgpu")


def test_the_library_renders_with_any_tools() -> None:
    """The refusals are the CLI's: `render` stays pure, for tests and other callers."""
    files = render(HostConfig(), Tools("/nowhere/python", "relative/deskgpu")).by_path()
    assert "ExecStart=/nowhere/python -m sky.server.server" in (
        files[f"{UNITS}/skypilot-api.service"].text
    )


# ---------------------------------------------------------------------------------------------
# install.sh: every precondition before any change; safe to run again


def _stub_bin(tmp: Path, uid: int) -> tuple[Path, Path]:
    """A PATH dir whose `id` reports `uid` and whose changing commands only log their calls."""
    bin_dir, log = tmp / "stub-bin", tmp / "calls.log"
    bin_dir.mkdir()
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    for name in ("useradd", "install", "systemctl", "systemd-tmpfiles"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return bin_dir, log


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_install_script_refuses_before_changing_anything(tmp_path) -> None:
    """Not root, programs missing, a rendered file missing: each is listed, exit 1, and no
    command that changes the host ran (they are stubs that log here: nothing real can run)."""
    out = tmp_path / "box"
    tools = Tools(str(tmp_path / "no/python"), str(tmp_path / "no/deskgpu"))
    write(render(load_config(HOST_CONFIG), tools, HOST_CONFIG.read_text()), out)
    (out / UNITS / "deskgpu-reap.timer").unlink()
    bin_dir, log = _stub_bin(tmp_path, uid=1000)
    result = subprocess.run(
        ["sh", str(out / "install.sh")],
        capture_output=True,
        text=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        timeout=30,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    problems = result.stderr.splitlines()
    assert problems[0] == "install.sh: not installing, nothing was changed:"
    for expected in (
        "run it as root",
        f"{tools.python} (the Python that runs the API server) is not an executable file",
        f"{tools.deskgpu} (the deskgpu command the timers run) is not an executable file",
        f"{out}/{UNITS}/deskgpu-reap.timer is missing",
    ):
        assert any(expected in line for line in problems), (expected, problems)
    if not Path(K3S_KUBECONFIG).exists():
        assert any(f"no {K3S_KUBECONFIG}" in line for line in problems)
    if not Path("/run/systemd/system").is_dir():
        assert any("systemd is not running" in line for line in problems)
    if not (
        shutil.which("kubectl", path="/usr/bin:/bin") or shutil.which("k3s", path="/usr/bin:/bin")
    ):
        assert any("no kubectl or k3s command" in line for line in problems)
    assert not log.exists(), log.read_text()


def test_install_script_changes_nothing_before_its_checks_and_can_run_again(rendered) -> None:
    out, _ = rendered
    lines = (out / "install.sh").read_text().splitlines()
    refuse = lines.index("    exit 1")
    changes = [
        i
        for i, line in enumerate(lines)
        if line.startswith(("install ", "systemctl ", "systemd-tmpfiles ", "useradd ", "kube "))
        or "|| useradd " in line
    ]
    assert changes and min(changes) > refuse
    # Again: the account is created only when missing, files are installed over themselves,
    # and enabling what is enabled is a no-op.
    assert any(re.match(r"^id -u skypilot >/dev/null 2>&1 \|\| useradd ", line) for line in lines)
    assert (
        "systemctl enable --now skypilot-kubeconfig.path skypilot-api.service "
        "deskgpu-observe.timer deskgpu-reap.timer" in lines
    )


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_install_script_passes_shellcheck(rendered) -> None:
    out, _ = rendered
    result = subprocess.run(
        ["shellcheck", "--shell=sh", str(out / "install.sh")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# The kubeconfig follows k3s


def test_the_kubeconfig_is_copied_at_every_start_and_on_every_change(tmp_path) -> None:
    config = HostConfig(
        doctor={"api_server_user": "svc-sky", "skypilot_server_config": "/srv/sky/.sky/config.yaml"}
    )
    files = render(config, Tools("/p", "/d")).by_path()
    copy = [
        "/usr/bin/install -d -o svc-sky -g svc-sky -m 0700 /srv/sky/.kube",
        f"/usr/bin/install -o svc-sky -g svc-sky -m 0600 {K3S_KUBECONFIG} /srv/sky/.kube/config",
    ]
    server = files[f"{UNITS}/skypilot-api.service"].text.splitlines()
    assert [line for line in server if line.startswith("ExecStartPre=")] == [
        f"ExecStartPre=+{c}"
        for c in copy  # `+`: as root, though User=svc-sky
    ]
    assert "Environment=HOME=/srv/sky KUBECONFIG=/srv/sky/.kube/config" in "\n".join(server)
    watch = _unit_text(files[f"{UNITS}/skypilot-kubeconfig.path"].text)
    assert watch["Path"]["PathChanged"] == K3S_KUBECONFIG
    assert watch["Path"]["Unit"] == "skypilot-kubeconfig.service"
    assert watch["Install"]["WantedBy"] == "paths.target"
    oneshot = files[f"{UNITS}/skypilot-kubeconfig.service"].text.splitlines()
    assert "Type=oneshot" in oneshot
    assert [line for line in oneshot if line.startswith("ExecStart=")] == [
        f"ExecStart={c}" for c in copy
    ]
    install = files["install.sh"].text
    assert f"install -o svc-sky -g svc-sky -m 0600 {K3S_KUBECONFIG}" not in install  # no copy
    assert "enable --now skypilot-kubeconfig.path" in install


def _unit_text(text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(text)
    return parser


# ---------------------------------------------------------------------------------------------
# systemd's own verdict on the units


def _systemd_problems(unit_dir: Path) -> list[str]:
    """What `systemd-analyze verify` says about the units in `unit_dir`.

    It exits 0 on an unknown key or an unparsable value (it only warns, "ignoring"), so every
    line that names one of these units counts. It does not check that `User=` exists or that
    `After=` units do (neither is an error for systemd either), but it does require every
    Exec program to be executable. Needs no running systemd. A unit's drop-in directory
    (`<unit>.d/`) is read with its unit; its lines name the unit too.
    """
    names = sorted(p.name for p in unit_dir.iterdir() if p.is_file())
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(f"./{n}" for n in names)],
        cwd=unit_dir,
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning", "SYSTEMD_PAGER": "", "LC_ALL": "C"},
        timeout=120,
    )
    lines = [line for line in result.stderr.splitlines() if any(n in line for n in names)]
    if result.returncode != 0:
        lines.append(f"systemd-analyze verify exited {result.returncode}: {result.stderr}")
    return lines


def _render_units(tmp: Path, config: HostConfig) -> Path:
    out = tmp / "box"
    write(render(config, _real_tools()), out)
    return out / UNITS


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


@needs_systemd_analyze
@pytest.mark.parametrize(
    "config_file", ["examples/host-config.yaml", "tests/fixtures/doctor/host-config.yaml"]
)
def test_systemd_accepts_every_unit(tmp_path, config_file) -> None:
    unit_dir = _render_units(tmp_path, load_config(ROOT / config_file))
    assert len(list(unit_dir.iterdir())) == 7
    assert _systemd_problems(unit_dir) == []


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("unit", "line", "defect", "said"),
    [
        ("skypilot-api.service", "Restart=on-failure", "Restrat=on-failure", "Unknown key"),
        ("deskgpu-reap.timer", "OnCalendar=Sun *-*-* 03:00:00", "OnCalendar=Sun 99:00", "calendar"),
        (
            "skypilot-kubeconfig.path",
            f"PathChanged={K3S_KUBECONFIG}",
            "PathChanged=k3s.yaml",
            "PathChanged",
        ),
        ("deskgpu-observe.service", "Type=oneshot", "Type=oneshoot", "service type"),
    ],
)
def test_the_systemd_check_catches_a_defect(tmp_path, unit, line, defect, said) -> None:
    """The check above is not vacuous: one bad directive and it fails, saying where."""
    unit_dir = _render_units(tmp_path, load_config(HOST_CONFIG))
    path = unit_dir / unit
    text = path.read_text()
    assert f"\n{line}\n" in text
    path.write_text(text.replace(f"\n{line}\n", f"\n{defect}\n"))
    problems = _systemd_problems(unit_dir)
    assert any(unit in p and said.lower() in p.lower() for p in problems), problems


@needs_systemd_analyze
def test_the_systemd_check_catches_a_missing_program(tmp_path) -> None:
    out = tmp_path / "box"
    write(render(load_config(HOST_CONFIG), Tools(str(tmp_path / "no-python"), "/d")), out)
    problems = _systemd_problems(out / UNITS)
    assert any("no-python is not executable" in p for p in problems), problems


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
