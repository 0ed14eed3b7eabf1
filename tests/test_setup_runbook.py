"""docs/setup.md, walked: every command block is valid shell, every package, installer and chart
it installs names its version, every kubectl/helm line is one those tools have, and the
commands that can run here do: deskgpu's own (parsed by the real CLI, `setup render` and
`setup trial` run), and the install of deskgpu from this checkout into a fresh /opt-style
environment (offline, from uv's cache), whose `deskgpu setup render` must accept itself.

What cannot run here (apt, the NVIDIA driver, k3s, helm against a cluster) is checked for form
and versions only; the GPU-in-a-pod check that proves those steps on a real box is
`deskgpu doctor --gpu-pod` (tests/test_doctor_gpu_pod.py replays its kubectl traffic).
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deskgpu.kubenames import NVIDIA_RUNTIME_CLASS
from deskgpu.setup.cluster import KUBERNETES_VERSION
from deskgpu.setup.tools import INSTALLED

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "docs" / "setup.md"
# Installed unpinned on purpose, with the reason the page gives.
UNPINNED = {
    "docker.io": "Ubuntu's own package: its security updates come with the release",
    "nfs-common": "Ubuntu's own package, as docker.io",
    "nfs-kernel-server": "Ubuntu's own package, as docker.io",
}
# A package whose name carries its version (the driver branch).
VERSIONED_NAME = re.compile(r"^[a-z0-9.+-]+-\d{3}(-server)?$")
KUBECTL_VERBS = {"get", "label", "apply", "describe", "logs", "delete", "auth"}
K3S_FIRST_RUNTIME_CLASS = (1, 29)  # k3s creates the nvidia RuntimeClass from v1.29


def _blocks() -> list[str]:
    text = RUNBOOK.read_text()
    return re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)


def _commands() -> list[list[str]]:
    """Every simple command of every block: continuations joined, pipelines and && split,
    `sudo`/`env` and leading VAR=value assignments kept as words."""
    found = []
    for block in _blocks():
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if not line or line.startswith("#"):
                continue
            for part in re.split(r"\s(?:\||&&)\s", line):
                found.append(shlex.split(part, comments=True))
    return found


def _program(words: list[str]) -> tuple[str, list[str]]:
    """The program a command runs and its arguments, past sudo, env and assignments."""
    rest = list(words)
    while rest:
        head = rest[0]
        if head == "sudo" or head == "env":
            rest = rest[1:]
            while rest and rest[0].startswith("-"):  # sudo -u skypilot -H
                rest = rest[2:] if rest[0] == "-u" else rest[1:]
        elif re.match(r"^[A-Z_][A-Z0-9_]*=", head) or head == ".":
            rest = rest[1:]
        else:
            return Path(head).name, rest[1:]
    return "", []


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def test_every_block_is_valid_shell() -> None:
    blocks = _blocks()
    assert len(blocks) >= 10
    for block in blocks:
        done = subprocess.run(["bash", "-n"], input=block, text=True, capture_output=True)
        assert done.returncode == 0, (block, done.stderr)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_every_block_passes_shellcheck() -> None:
    for block in _blocks():
        done = subprocess.run(
            # SC1090: `. ~/deskgpu-trial/env.sh` is written at run time, not a file to follow.
            ["shellcheck", "--shell=bash", "--exclude=SC1090", "-"],
            input="#!/bin/bash\n" + block,
            text=True,
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, (block, done.stdout)


def test_every_package_is_pinned() -> None:
    seen = []
    for words in _commands():
        program, args = _program(words)
        if program != "apt-get" or "install" not in args:
            continue
        packages = [a for a in args[args.index("install") + 1 :] if not a.startswith("-")]
        for package in packages:
            seen.append(package)
            pinned = "=" in package or VERSIONED_NAME.match(package) or package in UNPINNED
            assert pinned, f"docs/setup.md installs {package} without a version"
    assert "nvidia-container-toolkit=1.17.8-1" in seen
    assert any(p.startswith("nvidia-driver-") for p in seen)
    # The toolkit's four packages move together.
    toolkit = {p.split("=")[1] for p in seen if "container" in p and "=" in p}
    assert len(toolkit) == 1


def test_k3s_is_pinned_to_a_version_that_serves_what_deskgpu_applies() -> None:
    """The server's k3s and every agent's (Adding a box): one version, pinned."""
    text = RUNBOOK.read_text().replace("\\\n", " ")
    lines = [c for c in text.splitlines() if "get.k3s.io" in c]
    assert len(lines) == 2  # the server's (step 5), an agent's (Adding a box)
    versions = {
        v for line in lines for v in re.findall(r"INSTALL_K3S_VERSION=(v[\d.]+\+k3s\d+)", line)
    }
    (version,) = versions
    assert all("INSTALL_K3S_VERSION=" in line for line in lines)
    assert _version(version)[:2] >= _version(KUBERNETES_VERSION)[:2]
    assert _version(version)[:2] >= K3S_FIRST_RUNTIME_CLASS


def test_installers_and_charts_name_their_versions() -> None:
    text = RUNBOOK.read_text()
    assert re.search(r"get\.helm\.sh/helm-v\d+\.\d+\.\d+-linux-amd64\.tar\.gz", text)
    assert re.search(r"astral\.sh/uv/\d+\.\d+\.\d+/install\.sh", text)
    charts = 0
    for words in _commands():
        program, args = _program(words)
        if program == "helm" and ("upgrade" in args or "install" in args):
            charts += 1
            assert "--version" in args, args
            assert re.match(r"^\d+\.\d+\.\d+$", args[args.index("--version") + 1])
            # The plugin runs with the NVIDIA runtime SkyPilot's pods use.
            assert f"runtimeClassName={NVIDIA_RUNTIME_CLASS}" in args
    assert charts == 1


def test_kubectl_lines_use_verbs_kubectl_has() -> None:
    used = set()
    for words in _commands():
        program, args = _program(words)
        if program == "k3s" and args[:1] == ["kubectl"]:
            program, args = "kubectl", args[1:]
        if program == "kubectl":
            verbs = [a for a in args if not a.startswith("-")]
            assert verbs and verbs[0] in KUBECTL_VERBS, words
            used.add(verbs[0])
    assert {"get", "label"} <= used


def test_the_install_goes_where_render_looks_for_it() -> None:
    text = RUNBOOK.read_text()
    venv = str(Path(INSTALLED["--python"]).parent.parent)
    assert f"UV_PROJECT_ENVIRONMENT={venv}" in text
    assert f"ln -sf {INSTALLED['--deskgpu']} /usr/local/bin/deskgpu" in text


def test_every_deskgpu_command_parses_with_the_real_cli(cli) -> None:
    commands = [
        args for words in _commands() for program, args in [_program(words)] if program == "deskgpu"
    ]
    assert len(commands) >= 8
    for args in commands:
        result = cli(*args, "--help")
        assert result.exit_code == 0, (args, result.output)


@pytest.mark.skipif(shutil.which("uv") is None, reason="no uv")
@pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="no /usr/bin/python3")
def test_installing_from_the_checkout_gives_a_deskgpu_render_accepts(
    tmp_path: Path, world_tmp: Path
) -> None:
    """Step 3 as written (offline: uv's cache holds the locked packages after `uv sync`), into
    a directory standing for /opt/deskgpu; then step 7's render with that install's defaults."""
    (line,) = [
        words
        for words in _commands()
        if _program(words)[0] == "uv" and "sync" in _program(words)[1]
    ]
    _, args = _program(line)
    args = [str(ROOT) if a == "~/deskgpu" else a for a in args]  # the page's clone: this one
    assert "--locked" in args and "--no-editable" in args and "--no-dev" in args
    opt = world_tmp / "opt" / "deskgpu"  # where the server's account may run it, as /opt
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(opt), "UV_NO_PROGRESS": "1"}
    # The suite runs with a HOME of its own: uv's cache is the one of the account's real HOME.
    real_home = {**env, "HOME": pwd.getpwuid(os.getuid()).pw_dir}
    env.setdefault(
        "UV_CACHE_DIR",
        subprocess.run(
            ["uv", "cache", "dir"], env=real_home, capture_output=True, text=True, check=True
        ).stdout.strip(),
    )
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run(
        ["uv", *args, "--offline", "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    deskgpu = opt / "bin" / "deskgpu"
    # Installed as a package: nothing in it points back at this checkout.
    site = next(opt.glob("lib/python*/site-packages/deskgpu"))
    assert not any(
        p.suffix == ".pth" and str(ROOT) in p.read_text() for p in site.parent.glob("*.pth")
    )
    box = tmp_path / "box"
    rendered = subprocess.run(
        [
            str(deskgpu),
            "setup",
            "render",
            "--config",
            str(ROOT / "examples/host-config.yaml"),
            "--out",
            str(box),
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        timeout=120,
    )
    assert rendered.returncode == 0, rendered.stderr
    unit = (box / "etc/systemd/system/skypilot-api.service").read_text()
    assert f"ExecStart={opt}/bin/python -m sky.server.server" in unit


def test_the_trial_commands_write_what_the_page_runs(cli, tmp_path: Path) -> None:
    (trial,) = [
        args
        for words in _commands()
        for program, args in [_program(words)]
        if program == "deskgpu" and args[:2] == ["setup", "trial"]
    ]
    out = tmp_path / "trial"
    args = [str(out) if a == "~/deskgpu-trial" else a for a in trial]
    args = [str(ROOT / a) if a.startswith("examples/") else a for a in args]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    text = RUNBOOK.read_text()
    for name in ("server.sh", "env.sh"):
        assert (out / name).is_file() and f"~/deskgpu-trial/{name}" in text
    assert os.access(out / "server.sh", os.X_OK)
    assert sys.executable in (out / "server.sh").read_text()


def test_every_docs_anchor_the_code_prints_lands() -> None:
    """Messages and generated files point into the docs by anchor: each one is a heading."""
    from tests.test_docs import _anchors

    seen = 0
    for source in (ROOT / "src" / "deskgpu").rglob("*.py"):
        for page, anchor in re.findall(r"docs/([\w-]+\.md)#([\w-]+)", source.read_text()):
            seen += 1
            assert anchor in _anchors(ROOT / "docs" / page), f"{source.name}: {page}#{anchor}"
    assert seen >= 3
