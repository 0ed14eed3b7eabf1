"""The rendered install.sh, run for real: twice, as root, in a private mount namespace.

`/etc` and `/var/lib` are overlays whose upper layers are this test's directories (the real
ones are never written), `/run` is a tmpfs holding `/run/systemd/system`, and k3s's kubeconfig
exists only in the overlay. useradd, install and the shell are the real ones. systemctl,
systemd-tmpfiles and kubectl are stubs: no systemd runs here and no k3s exists, so the stubs
keep the state those would keep (units enabled; objects applied; node labels) in a JSON file and
log every call. Installing twice must leave every file (content, mode, owner) and that state
exactly as the first run left them.

Root only (mount namespaces); CI runs as root.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deskgpu.config import HostConfig
from deskgpu.kubenames import ACCELERATOR_LABEL, NVIDIA_RUNTIME_CLASS
from deskgpu.setup.render import K3S_KUBECONFIG, RUNTIME_CLASS_FILE, Tools, render, write

pytestmark = [
    pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="no /usr/bin/python3"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a private mount namespace"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare (util-linux)"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="no useradd (passwd)"),
]

# The stub kubectl keeps what a cluster would: the objects applied (kind/name) and node labels.
KUBECTL = """#!{python}
import json, os, sys
import yaml
state_path = os.environ["STUB_STATE"]
with open(state_path) as f:
    state = json.load(f)
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write("kubectl " + " ".join(args) + "\\n")
assert args[:2] == ["--kubeconfig", "{kubeconfig}"], args
verb, rest = args[2], args[3:]
code = 0
if verb == "get" and rest[0] == "--raw":
    print(json.dumps({{"resources": [{{"name": "validatingadmissionpolicies"}}]}}))
elif verb == "get":
    code = 0 if rest[0] in state["objects"] else 1
elif verb == "apply":
    with open(rest[1]) as f:
        for doc in yaml.safe_load_all(f):
            key = doc["kind"].lower() + "/" + doc["metadata"]["name"]
            state["objects"][key] = doc
elif verb == "label":
    assert rest[:3] == ["nodes", "--all", "--overwrite"], rest
    for pair in rest[3:]:
        k, _, v = pair.partition("=")
        state["labels"][k] = v
else:
    code = 2
with open(state_path, "w") as f:
    json.dump(state, f, sort_keys=True)
sys.exit(code)
"""

SYSTEMCTL = """#!{python}
import json, os, sys
state_path = os.environ["STUB_STATE"]
with open(state_path) as f:
    state = json.load(f)
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write("systemctl " + " ".join(args) + "\\n")
code = 0
if args[:2] == ["is-active", "--quiet"]:
    code = 0 if args[2] in state["enabled"] else 3
elif args[:2] == ["enable", "--now"]:
    state["enabled"] = sorted(set(state["enabled"]) | set(args[2:]))
{restarts}elif args != ["daemon-reload"]:
    code = 2
with open(state_path, "w") as f:
    json.dump(state, f, sort_keys=True)
sys.exit(code)
"""
# What the stub accepts besides, where a test expects a unit restarted or reloaded.
_RESTARTS = """elif args[0] in ("restart", "reload-or-restart") and len(args) == 2:
    state["enabled"] = sorted(set(state["enabled"]) | {args[1]})
"""


def systemctl_stub(python: str, *, restarts: bool = False) -> str:
    """The stub systemctl: units enabled kept in STUB_STATE, every call in STUB_LOG; any
    other call fails (exit 2), restarts and reloads too unless `restarts`."""
    return SYSTEMCTL.format(python=python, restarts=_RESTARTS if restarts else "")


def upper_layers(tmp: Path) -> tuple[Path, Path]:
    """Where `run_in_private_mounts` keeps what was written to /etc and to /var/lib."""
    return tmp / "etc-upper", tmp / "varlib-upper"


def run_in_private_mounts(
    tmp: Path, lines: list[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run shell `lines` as root in a private mount namespace whose /etc and /var/lib are
    overlays (upper layers `upper_layers(tmp)`: the real ones are never written) and /run a
    tmpfs."""
    etc_up, lib_up = upper_layers(tmp)
    etc_work, lib_work = tmp / "etc-work", tmp / "varlib-work"
    for path in (etc_up, lib_up, etc_work, lib_work):
        path.mkdir()
    script = "\n".join(
        [
            "set -e",
            f"mount -t overlay overlay -o lowerdir=/etc,upperdir={etc_up},workdir={etc_work} /etc",
            f"mount -t overlay overlay -o lowerdir=/var/lib,upperdir={lib_up},workdir={lib_work} "
            "/var/lib",
            "mount -t tmpfs none /run",
            *lines,
        ]
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    return done


def _stubs(tmp: Path, state: dict[str, Any]) -> tuple[Path, Path, Path]:
    bin_dir, state_path, log = tmp / "stub-bin", tmp / "cluster.json", tmp / "calls.log"
    bin_dir.mkdir()
    state_path.write_text(json.dumps(state))
    python = sys.executable
    (bin_dir / "kubectl").write_text(KUBECTL.format(python=python, kubeconfig=K3S_KUBECONFIG))
    (bin_dir / "systemctl").write_text(systemctl_stub(python))
    (bin_dir / "systemd-tmpfiles").write_text(f'#!/bin/sh\necho "systemd-tmpfiles $*" >> {log}\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return bin_dir, state_path, log


def _tree(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every entry under `root`: mode, owner, group and content hash (or link target)."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = "-> " + os.readlink(path)
            else:
                what = ""
            seen[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, what)
    return seen


# The server's Python: one every account may run (install.sh runs it as the server's
# account, or nobody before that exists); the suite's own lives under root's 0700 home.
SYSTEM_PYTHON = "/usr/bin/python3"


def _install_twice(
    tmp: Path,
    config: HostConfig,
    state: dict[str, Any],
    python: str = SYSTEM_PYTHON,
    refused: bool = False,
) -> dict[str, Any]:
    box = tmp / "box"
    deskgpu = tmp / "opt/deskgpu/bin/deskgpu"
    deskgpu.parent.mkdir(parents=True)
    deskgpu.write_text("#!/bin/sh\n")
    deskgpu.chmod(0o755)
    write(render(config, Tools(python, str(deskgpu))), box)
    bin_dir, state_path, log = _stubs(tmp, state)
    kubeconfig = Path(K3S_KUBECONFIG)
    etc_up, lib_up = upper_layers(tmp)
    lines = [
        "mkdir -p /run/systemd/system " + str(kubeconfig.parent),
        f"echo 'apiVersion: v1' > {kubeconfig}",
        f'sh {box}/install.sh > {tmp}/run1.out 2>&1 || {{ echo "run 1: $?"; exit 1; }}',
        f"tar -C {etc_up} -cf {tmp}/etc1.tar . && tar -C {lib_up} -cf {tmp}/lib1.tar .",
        f"cp {state_path} {tmp}/cluster1.json",
        f"echo --- >> {log}",
        f'sh {box}/install.sh > {tmp}/run2.out 2>&1 || {{ echo "run 2: $?"; exit 1; }}',
    ]
    env = {
        "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
        "STUB_STATE": str(state_path),
        "STUB_LOG": str(log),
    }
    done = run_in_private_mounts(tmp, lines, env, timeout=120)
    outputs = {
        n: (tmp / f"{n}.out").read_text() for n in ("run1", "run2") if (tmp / f"{n}.out").exists()
    }
    if refused:
        assert done.returncode != 0 and "run 1: 1" in done.stdout, (done.stdout, outputs)
        return {
            "outputs": outputs,
            "tree": _tree(etc_up),
            "state": json.loads(state_path.read_text()),
        }
    assert done.returncode == 0, (done.stdout, done.stderr, outputs)
    return {
        "box": box,
        "trees": (_tree(etc_up), _tree(lib_up)),
        "first_state": json.loads((tmp / "cluster1.json").read_text()),
        "state": json.loads(state_path.read_text()),
        "runs": log.read_text().split("---\n"),
        "outputs": outputs,
        "tmp": tmp,
    }


def _first_trees(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    tmp: Path = result["tmp"]
    trees = []
    for name in ("etc1", "lib1"):
        into = tmp / name
        into.mkdir()
        subprocess.run(["tar", "-C", str(into), "-xpf", str(tmp / f"{name}.tar")], check=True)
        trees.append(_tree(into))
    return trees[0], trees[1]


def test_installing_twice_changes_nothing(tmp_path: Path) -> None:
    config = HostConfig(box_name="lab", gpus={"A6000": 4})
    result = _install_twice(tmp_path, config, {"objects": {}, "labels": {}, "enabled": []})
    etc1, lib1 = _first_trees(result)
    etc2, lib2 = result["trees"]
    # What the first run installed is there, owned as rendered.
    assert "deskgpu/config.yaml" in etc2 and "systemd/system/skypilot-api.service" in etc2
    sky_config = lib2["skypilot/.sky/config.yaml"]
    assert stat.S_IMODE(sky_config[0]) == 0o600 and sky_config[1] != 0  # the server's account
    # The second run changed no file, no mode, no owner, nothing on the cluster.
    assert etc2 == etc1
    assert lib2 == lib1
    assert result["state"] == result["first_state"]
    first, second = result["runs"]
    # The RuntimeClass went on once; the second run found it and left it.
    apply_rc = f"apply -f {result['box']}/{RUNTIME_CLASS_FILE}"
    assert apply_rc in first and apply_rc not in second
    assert f"get runtimeclass/{NVIDIA_RUNTIME_CLASS}" in second
    assert "already running" in result["outputs"]["run2"]


def test_a_python_the_servers_account_cannot_run_stops_the_install(tmp_path: Path) -> None:
    """A Python under a directory only root may enter (a pyenv under root's home): before the
    `skypilot` account exists it is tried as nobody, fails, and nothing is installed."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    python = private / "python3"
    python.symlink_to(SYSTEM_PYTHON)
    state = {"objects": {}, "labels": {}, "enabled": []}
    result = _install_twice(tmp_path, HostConfig(gpus={"A6000": 4}), state, str(python), True)
    out = result["outputs"]["run1"]
    assert f"the account nobody cannot run {python}" in out, out
    assert "nothing was changed" in out
    # Nothing but the test's own k3s kubeconfig: no file, no account, no cluster object.
    assert {p.split("/")[0] for p in result["tree"]} == {"rancher"}
    assert result["state"] == state


def test_the_cluster_gets_the_runtime_class_and_the_gpu_label(tmp_path: Path) -> None:
    config = HostConfig(box_name="lab", gpus={"A6000": 4})
    result = _install_twice(tmp_path, config, {"objects": {}, "labels": {}, "enabled": []})
    objects = result["state"]["objects"]
    runtime_class = objects[f"runtimeclass/{NVIDIA_RUNTIME_CLASS}"]
    assert runtime_class["handler"] == NVIDIA_RUNTIME_CLASS
    assert runtime_class["apiVersion"] == "node.k8s.io/v1"
    assert {"serviceaccount/deskgpu-job", "validatingadmissionpolicy/deskgpu-job-pods"} <= set(
        objects
    )
    assert result["state"]["labels"] == {ACCELERATOR_LABEL: "a6000"}
    assert {"skypilot-api.service", "deskgpu-observe.timer"} <= set(result["state"]["enabled"])


def test_a_runtime_class_k3s_made_is_left_alone(tmp_path: Path) -> None:
    """k3s v1.29+ creates `nvidia` itself when it finds the NVIDIA runtime: never replaced."""
    made_by_k3s = {"kind": "RuntimeClass", "metadata": {"name": "nvidia"}, "handler": "nvidia"}
    state = {"objects": {"runtimeclass/nvidia": made_by_k3s}, "labels": {}, "enabled": []}
    result = _install_twice(tmp_path, HostConfig(gpus={"H100": 8}), state)
    assert result["state"]["objects"]["runtimeclass/nvidia"] == made_by_k3s
    assert not any(RUNTIME_CLASS_FILE in run for run in result["runs"])
    assert result["state"]["labels"] == {ACCELERATOR_LABEL: "h100"}


def test_a_box_of_two_models_gets_no_label_and_is_told(tmp_path: Path) -> None:
    rendered = render(HostConfig(gpus={"H100": 8, "L40S": 2}), Tools("/p", "/d"))
    script = rendered.by_path()["install.sh"].text
    assert ACCELERATOR_LABEL not in script
    assert any(ACCELERATOR_LABEL in note and "label each node" in note for note in rendered.notes)
    manifest = yaml.safe_load_all(rendered.by_path()[RUNTIME_CLASS_FILE].text)
    assert [doc["kind"] for doc in manifest] == ["RuntimeClass"]


def test_the_names_install_sh_gives_the_cluster_are_the_ones_skypilot_reads() -> None:
    """kubenames' copies of SkyPilot's runtime class and GPU label, held equal to its code."""
    from sky.provision.kubernetes import instance, utils

    from deskgpu.kubenames import accelerator_label_value

    pod: dict[str, Any] = {"spec": {}}
    instance._configure_runtime_class(pod, True, True)
    assert pod["spec"]["runtimeClassName"] == NVIDIA_RUNTIME_CLASS
    formatter = utils.SkyPilotLabelFormatter
    assert formatter.get_label_key() == ACCELERATOR_LABEL
    assert formatter.get_label_values("A6000") == [accelerator_label_value("A6000")]
    assert formatter.get_accelerator_from_label_value(accelerator_label_value("H100")) == "H100"
