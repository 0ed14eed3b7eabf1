"""`deskgpu setup render --node NAME` for a cluster of boxes (issue 28): a 4x A6000 server and
two 8x H100 agents. Every node's files, through the real CLI: every script passes shellcheck,
every unit (the NFS mount units and the k3s drop-ins included) passes `systemd-analyze
verify`, the NFS exports and mount options parse by exports(5) and nfs(5), the manifests
validate as a single box's do, and an agent's install.sh refuses before changing anything,
never shows the join token, and changes nothing when run again (in a private mount
namespace, as tests/test_install_sh.py runs the server's). `systemd-analyze` and
`shellcheck` skip where absent (`.ci/run` installs both).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deskgpu.config import load_config
from deskgpu.config.nodes import SharedStorage
from deskgpu.doctor.facts import FileFact
from deskgpu.doctor.scheduled import find_scheduled, parse_args
from deskgpu.setup import nodes
from deskgpu.setup.agent import render_node
from deskgpu.setup.render import Tools, write
from deskgpu.setup.schedules import OBSERVE
from tests.conftest import EXAMPLES
from tests.test_install_sh import _tree, run_in_private_mounts, systemctl_stub, upper_layers
from tests.test_setup import _real_tools, _systemd_problems, needs_systemd_analyze

CLUSTER = EXAMPLES / "cluster/host-config.yaml"
NODES = ("lab-a6000", "lab-h100-1", "lab-h100-2")
UNITS = "etc/systemd/system"
TOKEN_MARKER = "K10deadbeefcafe::server:not-a-real-token"


@pytest.fixture
def cluster_files(cli, tmp_path: Path, installed_tools: list[str]) -> dict[str, Any]:
    """Every node's files, rendered by the real CLI: node -> (out dir, --json document)."""
    found = {}
    for name in NODES:
        out = tmp_path / name
        result = cli(
            "setup", "render", "--config", str(CLUSTER), "--node", name, "--out", str(out),
            "--json", *installed_tools,
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        found[name] = (out, json.loads(result.stdout))
    return found


def _paths(doc: dict[str, Any]) -> set[str]:
    return {f["path"] for f in doc["files"]}


def test_each_node_gets_its_own_files(cluster_files) -> None:
    out, server = cluster_files["lab-a6000"]
    assert (server["node"], server["role"]) == ("lab-a6000", "server")
    assert {
        "etc/systemd/system/skypilot-api.service",
        "kube/deskgpu-admission.yaml",
        "etc/exports.d/deskgpu.exports",
        "etc/systemd/system/deskgpu-reap.timer",
        "install.sh",
    } <= _paths(server)
    for name in NODES[1:]:
        out, agent = cluster_files[name]
        assert agent["role"] == "agent"
        assert _paths(agent) == {
            "etc/deskgpu/config.yaml",
            "etc/rancher/k3s/config.yaml",
            f"{UNITS}/data.mount",
            f"{UNITS}/checkpoints.mount",
            f"{UNITS}/k3s-agent.service.d/deskgpu-shared-storage.conf",
            "etc/tmpfiles.d/deskgpu.conf",
            f"{UNITS}/deskgpu-observe.service",
            f"{UNITS}/deskgpu-observe.timer",
            "install.sh",
        }
        # The same host config on every node, byte for byte.
        assert (out / "etc/deskgpu/config.yaml").read_bytes() == CLUSTER.read_bytes()
        for f in agent["files"]:
            assert oct((out / f["path"]).stat().st_mode & 0o777)[2:].zfill(4) == f["mode"]


def test_an_agent_joins_the_server_as_itself_with_its_labels(cluster_files) -> None:
    out, _ = cluster_files["lab-h100-2"]
    k3s = yaml.safe_load((out / "etc/rancher/k3s/config.yaml").read_text())
    assert k3s == {
        "server": "https://10.0.0.10:6443",
        "token-file": "/etc/deskgpu/k3s-token",
        "node-name": "lab-h100-2",
        "node-label": ["nvidia.com/gpu.present=true", "skypilot.co/accelerator=h100"],
    }


def test_the_server_labels_every_joined_node_and_records_its_version(cluster_files) -> None:
    from deskgpu import __version__

    out, _ = cluster_files["lab-a6000"]
    script = (out / "install.sh").read_text()
    for name, model in (("lab-a6000", "a6000"), ("lab-h100-1", "h100"), ("lab-h100-2", "h100")):
        assert (
            f"if kube get node {name} >/dev/null 2>&1; then kube label node {name} --overwrite "
            f"nvidia.com/gpu.present=true skypilot.co/accelerator={model} >/dev/null; fi"
        ) in script
    assert f"kube annotate node lab-a6000 --overwrite deskgpu.io/version={__version__}" in script
    assert "label nodes --all" not in script
    assert re.search(r"^systemctl enable --now nfs-server\.service$", script, re.M)
    assert "\nexportfs -ra\n" in script


def test_the_observe_timer_of_an_agent_is_what_doctor_counts(cluster_files) -> None:
    out, _ = cluster_files["lab-h100-1"]
    service = out / UNITS / OBSERVE.service
    (entry,) = find_scheduled({"systemd:x": FileFact(str(service), True, service.read_text())})
    assert parse_args(entry.args) == parse_args(OBSERVE.args)
    assert "After=network-online.target k3s-agent.service" in service.read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_every_nodes_install_script_passes_shellcheck(cluster_files) -> None:
    for name in NODES:
        out, _ = cluster_files[name]
        result = subprocess.run(
            ["shellcheck", "--shell=sh", str(out / "install.sh")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (name, result.stdout + result.stderr)


def _units(tmp: Path, config_node: str, *, storage: SharedStorage | None = None) -> Path:
    """A node's units, rendered with programs that exist here, with a stand-in for the k3s
    unit its drop-in extends (k3s's installer writes the real one)."""
    config = load_config(CLUSTER)
    if storage is not None:
        config = dataclasses.replace(config, storage=storage)
    out = tmp / config_node
    write(render_node(config, _real_tools(), node=config_node), out)
    unit_dir = out / UNITS
    for dropin in unit_dir.glob("*.d"):
        (unit_dir / dropin.name.removesuffix(".d")).write_text(
            "[Unit]\nDescription=k3s (a stand-in)\n[Service]\nExecStart=/bin/true\n"
        )
    return unit_dir


NAS = SharedStorage("nas.lab:/export/data", "nas.lab:/export/checkpoints")


@needs_systemd_analyze
@pytest.mark.parametrize("storage", [None, NAS], ids=["server-nfs", "nas"])
@pytest.mark.parametrize("node", NODES)
def test_systemd_accepts_every_unit_mounts_and_drop_ins_included(tmp_path, node, storage) -> None:
    unit_dir = _units(tmp_path, node, storage=storage)
    names = {p.name for p in unit_dir.iterdir()}
    if node != "lab-a6000" or storage is not None:
        assert {"data.mount", "checkpoints.mount"} <= names
    assert _systemd_problems(unit_dir) == []


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("path", "line", "defect", "said"),
    [
        ("data.mount", "Where=/data", "Where=/srv/data", "doesn't match unit name"),
        ("checkpoints.mount", "Type=nfs", "Typ=nfs", "unknown key"),
        (
            "k3s-agent.service.d/deskgpu-shared-storage.conf",
            "RequiresMountsFor=/data /checkpoints",
            "RequiresMountFor=/data /checkpoints",
            "unknown key",
        ),
    ],
)
def test_the_systemd_check_catches_a_defect_in_a_mount_or_drop_in(
    tmp_path, path, line, defect, said
) -> None:
    unit_dir = _units(tmp_path, "lab-h100-1")
    target = unit_dir / path
    text = target.read_text()
    assert f"\n{line}\n" in text
    target.write_text(text.replace(f"\n{line}\n", f"\n{defect}\n"))
    problems = _systemd_problems(unit_dir)
    assert any(said.lower() in p.lower() for p in problems), problems


# ---------------------------------------------------------------------------------------------
# exports(5) and nfs(5): the files parse as the kernel's NFS tools read them

# exports(5) "General Options" and "User ID Mapping" (nfs-utils 2.x), and nfs(5)/mount(8)
# options an NFS mount takes (the generic ones mount(8) lists, and nfs(5)'s).
EXPORT_OPTIONS = {
    "secure", "insecure", "rw", "ro", "async", "sync", "no_wdelay", "wdelay", "nohide", "hide",
    "crossmnt", "no_subtree_check", "subtree_check", "insecure_locks", "no_auth_nlm",
    "secure_locks", "auth_nlm", "mountpoint", "mp", "fsid", "nordirplus", "refer", "replicas",
    "pnfs", "no_pnfs", "security_label", "sec", "root_squash", "no_root_squash", "all_squash",
    "no_all_squash", "anonuid", "anongid",
}  # fmt: skip
MOUNT_OPTIONS = {
    "ro", "rw", "sync", "async", "atime", "noatime", "nodiratime", "relatime", "suid", "nosuid",
    "dev", "nodev", "exec", "noexec", "auto", "noauto", "nofail", "_netdev", "hard", "soft",
    "softreval", "intr", "nointr", "timeo", "retrans", "rsize", "wsize", "ac", "noac",
    "actimeo", "bg", "fg", "nfsvers", "vers", "proto", "port", "sec", "sharecache", "lookupcache",
    "local_lock", "nconnect", "lock", "nolock", "cto", "nocto", "fsc", "nofsc", "minorversion",
}  # fmt: skip
_HOST = re.compile(r"^(\*|[A-Za-z0-9*?]([A-Za-z0-9*?.-]*[A-Za-z0-9*?])?|[0-9./]+|@[\w.-]+)$")


def parse_exports(text: str) -> list[tuple[str, list[tuple[str, list[str]]]]]:
    """exports(5): one export point per line (`\\` continues it, `#` starts a comment): a path,
    then clients each `host(options)`, no blank between a host and its `(`: that would
    export to the world with the options and to the host with the defaults."""
    logical, pending = [], ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        if (pending + line).strip():
            logical.append(pending + line)
        pending = ""
    out = []
    for line in logical:
        path, *clients = line.split()
        assert path.startswith("/"), f"export path {path!r} is not absolute"
        parsed = []
        for client in clients:
            found = re.fullmatch(r"([^()\s]+)\(([^()\s]*)\)", client)
            assert found, f"{client!r}: `host(options)` with no blank between"
            host, options = found.group(1), found.group(2).split(",")
            assert _HOST.match(host), f"{host!r} is not a host, network or netgroup"
            for option in options:
                assert option.split("=", 1)[0] in EXPORT_OPTIONS, f"{option!r} not in exports(5)"
            assert not {"ro", "rw"} <= set(options), "both ro and rw"
            parsed.append((host, options))
        assert parsed, f"{path}: no client (it would export to the world)"
        out.append((path, parsed))
    return out


def parse_mount_options(value: str) -> dict[str, str | None]:
    """A mount unit's `Options=` as mount(8) takes them: comma-separated, `key[=value]`."""
    found: dict[str, str | None] = {}
    for option in value.split(","):
        key, _, arg = option.partition("=")
        assert key in MOUNT_OPTIONS, f"{option!r} is not a mount(8)/nfs(5) option"
        assert key not in found, f"{key} given twice"
        found[key] = arg or None
    assert not {"ro", "rw"} <= set(found), "both ro and rw"
    return found


def _unit_values(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def test_the_servers_exports_parse_and_reach_only_the_agents(cluster_files) -> None:
    out, _ = cluster_files["lab-a6000"]
    exports = dict(parse_exports((out / "etc/exports.d/deskgpu.exports").read_text()))
    assert set(exports) == {"/data", "/checkpoints"}
    for path, clients in exports.items():
        assert [host for host, _ in clients] == ["10.0.0.11", "10.0.0.12"]
        for _, options in clients:
            assert ("ro" if path == "/data" else "rw") in options and "sync" in options
            assert ("root_squash" if path == "/data" else "no_root_squash") in options


def test_the_agents_mounts_parse_and_mount_the_servers_exports(cluster_files) -> None:
    server_out, _ = cluster_files["lab-a6000"]
    exported = dict(parse_exports((server_out / "etc/exports.d/deskgpu.exports").read_text()))
    out, _ = cluster_files["lab-h100-1"]
    expected = (("data.mount", "/data", "ro"), ("checkpoints.mount", "/checkpoints", "rw"))
    for unit, path, mode in expected:
        text = (out / UNITS / unit).read_text()
        (what,) = _unit_values(text, "What")
        host, _, remote = what.partition(":")
        assert (host, remote) == ("10.0.0.10", path) and remote in exported
        assert _unit_values(text, "Where") == [path] and _unit_values(text, "Type") == ["nfs"]
        (options,) = _unit_values(text, "Options")
        parsed = parse_mount_options(options)
        assert mode in parsed and {"hard", "nosuid", "nodev"} <= set(parsed)
    dropin = (out / UNITS / "k3s-agent.service.d/deskgpu-shared-storage.conf").read_text()
    assert _unit_values(dropin, "RequiresMountsFor") == ["/data /checkpoints"]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("/data 10.0.0.11 (ro)\n", "no blank between"),
        ("/data 10.0.0.11(ro,rw)\n", "both ro and rw"),
        ("/data 10.0.0.11(ro,no_root_sqash)\n", "not in exports(5)"),
        ("data 10.0.0.11(ro)\n", "not absolute"),
        ("/data\n", "no client"),
    ],
)
def test_the_exports_parser_catches_a_defect(text: str, why: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(why)):
        parse_exports(text)


def test_a_nas_is_mounted_on_every_node_and_nothing_is_exported(tmp_path) -> None:
    config = dataclasses.replace(load_config(CLUSTER), storage=NAS)
    tools = Tools("/opt/deskgpu/bin/python", "/opt/deskgpu/bin/deskgpu")
    for name in NODES:
        files = render_node(config, tools, node=name).by_path()
        assert "etc/exports.d/deskgpu.exports" not in files
        data = files[f"{UNITS}/data.mount"].text
        assert _unit_values(data, "What") == ["nas.lab:/export/data"]
        ckpt = files[f"{UNITS}/checkpoints.mount"].text
        assert _unit_values(ckpt, "What") == ["nas.lab:/export/checkpoints"]
        k3s = "k3s.service" if name == "lab-a6000" else "k3s-agent.service"
        assert f"{UNITS}/{k3s}.d/deskgpu-shared-storage.conf" in files
        script = files["install.sh"].text
        assert "command -v mount.nfs" in script
        assert "systemctl enable --now data.mount checkpoints.mount" in script
        assert "exportfs" not in script


def test_the_manifests_validate_as_a_single_boxs_do(cluster_files) -> None:
    import kubernetes_validate

    from deskgpu.setup import cluster

    out, doc = cluster_files["lab-a6000"]
    applied = [f["path"] for f in doc["files"] if f["apply"]]
    assert applied
    for path in applied:
        for manifest in yaml.safe_load_all((out / path).read_text()):
            version = f"{cluster.KUBERNETES_VERSION}.0"
            assert kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["--config", str(CLUSTER), "--node", "lab-gpu9"],
            "--node lab-gpu9: no such node in the host config",
        ),
        (
            ["--config", str(EXAMPLES / "host-config.yaml"), "--node", "lab-a6000"],
            "describes one box (no `nodes:`); render without --node",
        ),
    ],
)
def test_a_node_the_config_does_not_have_is_exit_2(cli, tmp_path, args, said) -> None:
    result = cli("setup", "render", "--out", str(tmp_path / "o"), *args)
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert said in line, line
    if "lab-gpu9" in said:
        assert "lab-a6000 (server), lab-h100-1 (agent), lab-h100-2 (agent)" in line
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# An agent's install.sh: every precondition first; the token never shown; twice is once


def _stub(bin_dir: Path, name: str, body: str = "exit 0") -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _agent_box(tmp: Path) -> Path:
    box = tmp / "box"
    deskgpu = tmp / "opt/deskgpu/bin/deskgpu"
    deskgpu.parent.mkdir(parents=True)
    _stub(deskgpu.parent, "deskgpu")
    config = load_config(CLUSTER)
    write(render_node(config, Tools(sys.executable, str(deskgpu)), node="lab-h100-1"), box)
    return box


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_an_agents_install_refuses_before_changing_anything(tmp_path) -> None:
    """Not root, no k3s agent, no token, no NFS client or NVIDIA runtime, the server silent:
    each is listed, exit 1, and nothing that changes the host ran (stubs log here)."""
    box = _agent_box(tmp_path)
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    _stub(bin_dir, "id", "echo 1000")
    _stub(bin_dir, "curl", "exit 7")  # connection refused
    for name in ("install", "systemctl", "systemd-tmpfiles"):
        _stub(bin_dir, name, f'echo "{name} $*" >> {log}')
    result = subprocess.run(
        ["sh", str(box / "install.sh")],
        capture_output=True,
        text=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        timeout=30,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    problems = result.stderr.splitlines()
    assert problems[0] == "install.sh: not installing, nothing was changed:"
    expected = [
        "run it as root",
        "the k3s server at https://10.0.0.10:6443 does not answer",
        "no join token in /etc/deskgpu/k3s-token: copy the server's "
        "/var/lib/rancher/k3s/server/node-token there",
    ]
    if not shutil.which("k3s", path="/usr/bin:/bin"):
        expected.append("no k3s command: install k3s as an agent, not started")
    if not Path("/etc/systemd/system/k3s-agent.service").exists():
        expected.append("no /etc/systemd/system/k3s-agent.service")
    if not shutil.which("mount.nfs", path="/usr/bin:/bin"):
        expected.append("no mount.nfs")
    if not shutil.which("nvidia-container-runtime", path="/usr/bin:/bin"):
        expected.append("no nvidia-container-runtime")
    for text in expected:
        assert any(text in line for line in problems), (text, problems)
    assert not log.exists(), log.read_text()


def _namespace_install_twice(tmp: Path, token_mode: int = 0o600) -> dict[str, Any]:
    """Run the agent's install.sh twice as root, /etc and /var/lib overlays, /run a tmpfs."""
    box = _agent_box(tmp)
    bin_dir, state_path, log = tmp / "bin", tmp / "state.json", tmp / "calls.log"
    bin_dir.mkdir()
    state_path.write_text(json.dumps({"enabled": []}))
    (bin_dir / "systemctl").write_text(systemctl_stub(sys.executable))
    (bin_dir / "systemctl").chmod(0o755)
    _stub(bin_dir, "systemd-tmpfiles", f'echo "systemd-tmpfiles $*" >> {log}')
    _stub(bin_dir, "curl", f'echo "curl $*" >> {log}; echo pong')
    for name in ("k3s", "mount.nfs", "nvidia-container-runtime"):
        _stub(bin_dir, name, f'echo "{name} $*" >> {log}')
    etc_up, lib_up = upper_layers(tmp)
    token = nodes.K3S_TOKEN_FILE
    lines = [
        "mkdir -p /run/systemd/system /etc/systemd/system /etc/deskgpu",
        "printf '[Service]\\nExecStart=/usr/local/bin/k3s agent\\n' "
        "> /etc/systemd/system/k3s-agent.service",
        f"(umask 077; printf '%s\\n' '{TOKEN_MARKER}' > {token}); chmod {token_mode:o} {token}",
        f'sh {box}/install.sh > {tmp}/run1.out 2>&1 || {{ echo "run 1: $?"; exit 1; }}',
        f"tar -C {etc_up} -cf {tmp}/etc1.tar . && tar -C {lib_up} -cf {tmp}/lib1.tar .",
        f"cp {state_path} {tmp}/state1.json",
        f"echo --- >> {log}",
        f'sh {box}/install.sh > {tmp}/run2.out 2>&1 || {{ echo "run 2: $?"; exit 1; }}',
    ]
    env = {
        "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
        "STUB_STATE": str(state_path),
        "STUB_LOG": str(log),
    }
    done = run_in_private_mounts(tmp, lines, env, timeout=120)
    runs = [tmp / f"{n}.out" for n in ("run1", "run2")]
    outputs = {p.stem: p.read_text() for p in runs if p.exists()}
    firsts = []
    for name in ("etc1", "lib1"):
        into = tmp / name
        into.mkdir()
        if (tmp / f"{name}.tar").exists():
            subprocess.run(["tar", "-C", str(into), "-xpf", str(tmp / f"{name}.tar")], check=True)
        firsts.append(_tree(into))
    return {
        "done": done,
        "outputs": outputs,
        "trees": (_tree(etc_up), _tree(lib_up)),
        "firsts": tuple(firsts),
        "state": json.loads(state_path.read_text()),
        "first_state": json.loads((tmp / "state1.json").read_text())
        if (tmp / "state1.json").exists()
        else None,
        "log": log.read_text() if log.exists() else "",
        "etc": etc_up,
    }


needs_namespace = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a private mount namespace"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare (util-linux)"),
]


@needs_namespace[0]
@needs_namespace[1]
def test_an_agents_install_twice_changes_nothing(tmp_path) -> None:
    result = _namespace_install_twice(tmp_path)
    assert result["done"].returncode == 0, (
        result["done"].stdout,
        result["done"].stderr,
        result["outputs"],
    )
    etc1, lib1 = result["firsts"]
    etc2, lib2 = result["trees"]
    assert "rancher/k3s/config.yaml" in etc2 and "systemd/system/data.mount" in etc2
    assert "systemd/system/k3s-agent.service.d/deskgpu-shared-storage.conf" in etc2
    assert etc2 == etc1 and lib2 == lib1
    assert result["state"] == result["first_state"]
    assert set(result["state"]["enabled"]) == {
        "data.mount", "checkpoints.mount", "k3s-agent.service", "deskgpu-observe.timer",
    }  # fmt: skip
    first, _ = result["log"].split("---\n")
    assert "curl -ksf --max-time 10 https://10.0.0.10:6443/ping" in first
    assert "already running" in result["outputs"]["run2"]
    # The token was read by nobody here: not in any output, log or installed file, untouched.
    token = result["etc"] / "deskgpu/k3s-token"
    assert token.read_text() == TOKEN_MARKER + "\n"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    seen = result["log"] + "".join(result["outputs"].values()) + result["done"].stdout
    assert TOKEN_MARKER not in seen
    for path in (result["etc"] / "rancher").rglob("*"):
        if path.is_file():
            assert TOKEN_MARKER not in path.read_text()


@needs_namespace[0]
@needs_namespace[1]
def test_an_agents_install_refuses_a_token_others_can_read(tmp_path) -> None:
    result = _namespace_install_twice(tmp_path, token_mode=0o644)
    assert result["done"].returncode == 1
    out = result["outputs"]["run1"]
    assert "/etc/deskgpu/k3s-token must be root's and mode 0600" in out
    assert TOKEN_MARKER not in out
    # Only what the test itself put there: install.sh changed nothing.
    assert set(result["trees"][0]) <= {
        "systemd", "systemd/system", "systemd/system/k3s-agent.service", "deskgpu",
        "deskgpu/k3s-token",
    }  # fmt: skip
