"""An offline box: the accelerator catalog `deskgpu setup render` writes for the box's GPUs is
what SkyPilot reads on its API server, so a GPU launch gets past it without network
(src/deskgpu/setup/catalog.py says which files SkyPilot 0.14 reads, and when it fetches).

SkyPilot's own readers check the files in a child process whose HOME holds them and whose
`requests.get` refuses: a fetch would show. The real thing is a SkyPilot API server started
from the rendered files whose only way out is a proxy on loopback that forwards nothing and
records what it was asked for; it works as any user (a network namespace would need root),
and nothing leaves the machine. Without the catalog the server's GPU launch fails with the
catalog error (and the proxy saw it try); with it the launch gets to provisioning and fails
there, for the absence of a Kubernetes cluster, and the proxy saw no catalog fetch.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from deskgpu.config import HostConfig, load_config
from deskgpu.setup import catalog
from deskgpu.setup.render import SERVER_HOME, SERVER_USER, Tools, render
from deskgpu.snapshot import NvmlView, Snapshot
from tests.apiserver import free_port, running_api_server
from tests.conftest import ROOT
from tests.test_hardening_server import _rendered

DESKGPU = str(Path(sys.executable).with_name("deskgpu"))
SNAPSHOTS = ROOT / "tests" / "fixtures" / "snapshots"
CATALOG_HOSTS = ("raw.githubusercontent.com", "skypilot-catalog.s3.us-east-1.amazonaws.com")
TOOLS = Tools("/opt/deskgpu/bin/python", "/opt/deskgpu/bin/deskgpu")
ACCELERATORS = f"{SERVER_HOME}/.sky/catalogs/v8/common/accelerators.csv".lstrip("/")


def _files(config: HostConfig, seen: dict[str, int] | None = None) -> dict[str, str]:
    """The catalog files `render` writes: path under the server's HOME -> text."""
    rendered = render(config, TOOLS, seen_gpus=seen).files
    home = SERVER_HOME.lstrip("/") + "/"
    return {f.path.removeprefix(home): f.text for f in rendered if "/catalogs/" in f.path}


# ---------------------------------------------------------------------------------------------
# One source of truth: the copies of SkyPilot's constants


def test_the_catalog_constants_are_skypilots() -> None:
    from sky.catalog import common
    from sky.skylet import constants
    from sky.utils import accelerator_registry, registry

    assert catalog.SCHEMA_VERSION == constants.CATALOG_SCHEMA_VERSION
    assert catalog.CATALOG_DIR == constants.CATALOG_DIR
    # The file the accelerator registry reads is the one written.
    assert accelerator_registry._accelerator_df._filename == common.get_catalog_path(
        catalog.ACCELERATORS
    )
    for infra, cloud in catalog.CLOUD_OF_INFRA.items():
        assert str(registry.CLOUD_REGISTRY.from_str(infra)) == cloud


# ---------------------------------------------------------------------------------------------
# What is written, and when


def test_the_box_gets_one_accelerator_catalog_of_its_own_gpus() -> None:
    files = _files(HostConfig(gpus={"A6000": 4, "H100": 8}))
    assert files == {
        ".sky/catalogs/v8/common/accelerators.csv": (
            "AcceleratorName,Clouds\nA6000,['Kubernetes']\nH100,['Kubernetes']\n"
        )
    }
    (owned,) = [
        f for f in render(HostConfig(gpus={"A6000": 4}), TOOLS).files if "/catalogs/" in f.path
    ]
    assert (owned.path, owned.owner, owned.mode, owned.optional) == (
        ACCELERATORS,
        SERVER_USER,
        0o644,
        False,
    )
    assert owned.destination == "/" + ACCELERATORS


def test_an_ssh_node_pool_box_lists_its_gpus_for_ssh() -> None:
    files = _files(HostConfig(infra="ssh/lab", gpus={"L40S": 2}))
    assert list(files.values()) == ["AcceleratorName,Clouds\nL40S,['SSH']\n"]


def test_a_cloud_infra_gets_no_catalog_of_the_box() -> None:
    """A box-only catalog would hide the cloud's own (SkyPilot never refetches a file it did
    not download), so nothing is written and nothing is said."""
    rendered = render(HostConfig(infra="aws", gpus={"A6000": 4}), TOOLS, seen_gpus={"T4": 1})
    assert not [f for f in rendered.files if "/catalogs/" in f.path]
    assert not [n for n in rendered.notes if "catalog" in n]


def _nvml(snapshot: str) -> NvmlView:
    doc = json.loads((SNAPSHOTS / f"{snapshot}.json").read_text())
    return Snapshot.from_dict(doc).nvml


@pytest.mark.parametrize(
    ("snapshot", "seen"),
    [
        ("busy_box", {"A6000": 4}),
        ("gpu_fell_off_the_bus", {"A6000": 3}),  # the lost one is not counted
        ("no_driver_sky_only", {}),
    ],
)
def test_without_gpus_the_catalog_lists_what_nvml_sees(snapshot: str, seen: dict[str, int]) -> None:
    config = HostConfig()
    assert catalog.seen_gpus(config, lambda: _nvml(snapshot)) == seen
    rendered = render(config, TOOLS, seen_gpus=seen)
    files = [f for f in rendered.files if "/catalogs/" in f.path]
    said = [n for n in rendered.notes if "accelerator catalog" in n]
    if seen:
        (written,) = files
        assert written.text == "AcceleratorName,Clouds\nA6000,['Kubernetes']\n"
        assert "NVML" in written.purpose
        (note,) = said
        assert "what NVML sees here, {A6000: " in note and "`gpus: {A6000: " in note
    else:
        assert files == []
        (note,) = said
        assert note.startswith("no accelerator catalog written") and "set gpus:" in note


def test_the_host_configs_gpus_win_and_nvml_is_not_read() -> None:
    def unread() -> NvmlView:
        raise AssertionError("NVML read although the host config lists GPUs")

    config = HostConfig(gpus={"H100": 8})
    assert catalog.seen_gpus(config, unread) == {}
    assert list(_files(config, seen={"A6000": 4}).values()) == [
        "AcceleratorName,Clouds\nH100,['Kubernetes']\n"
    ]


def test_a_box_without_default_image_is_told_what_an_offline_box_needs() -> None:
    plain = render(HostConfig(gpus={"A6000": 4}), TOOLS).notes
    assert any("no default_image" in n and "kubernetes/images.csv" in n for n in plain)
    imaged = render(HostConfig(gpus={"A6000": 4}, default_image="pytorch:24"), TOOLS).notes
    assert not [n for n in imaged if "default_image" in n]


def test_install_sh_gives_the_catalog_directories_to_the_server_first() -> None:
    """`install -D` leaves the directories it creates root's; SkyPilot, as the server's
    account, must still write `.meta/` and other clouds' catalogs there."""
    files = render(HostConfig(gpus={"A6000": 4}), TOOLS).by_path()
    lines = files["install.sh"].text.splitlines()
    dirs = " ".join(catalog.directories(SERVER_HOME))
    (made,) = [i for i, line in enumerate(lines) if line.endswith(dirs)]
    assert lines[made].startswith(f"install -d -o {SERVER_USER} -g {SERVER_USER} ")
    (copied,) = [i for i, line in enumerate(lines) if line.endswith(" /" + ACCELERATORS)]
    assert made < copied


def test_the_setup_command_writes_the_catalog(cli, tmp_path: Path, installed_tools) -> None:
    out = tmp_path / "box"
    config = tmp_path / "host-config.yaml"
    config.write_text("gpus: {H100: 8}\ndefault_image: nvcr.io/nvidia/pytorch:24.05-py3\n")
    result = cli("setup", "render", "--out", str(out), "--config", str(config), *installed_tools)
    assert result.exit_code == 0, result.stderr
    assert (out / ACCELERATORS).read_text() == "AcceleratorName,Clouds\nH100,['Kubernetes']\n"
    assert "catalog" not in result.stderr  # nothing to tell: gpus and default_image are set


# ---------------------------------------------------------------------------------------------
# SkyPilot's own readers answer from the files, and fetch nothing

_READ = """
import json, os, sys
import requests

fetched = []


def refuse(url, *args, **kwargs):
    fetched.append(url)
    raise requests.exceptions.ConnectionError(f"no network in this test: {url}")


requests.get = refuse  # SkyPilot fetches catalogs with requests.get (catalog/common.py)
import sky
from sky.catalog import common
from sky.utils import accelerator_registry

model, count = sys.argv[1], int(sys.argv[2])
out = {}
try:
    frame = common.read_catalog("common/accelerators.csv")
    out["rows"] = frame[["AcceleratorName", "Clouds"]].values.tolist()
    k8s = sky.clouds.Kubernetes()
    canonical = accelerator_registry.canonicalize_accelerator_name
    out["exact"] = canonical(model.lower(), k8s)
    out["partial"] = canonical(model.lower()[:-1], k8s)
    out["any_cloud"] = canonical(model.lower(), None)
    resources = sky.Resources(infra="k8s", accelerators=f"{model.lower()}:{count}")
    resources.validate()  # what the server's /validate and the optimizer run
    out["validated"] = resources.accelerators
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
out["fetched"] = fetched
meta = os.path.join(os.path.dirname(common.get_catalog_path("x.csv")), ".meta")
out["meta"] = sorted(os.listdir(meta)) if os.path.isdir(meta) else []
print(json.dumps(out))
"""


def _read_with_skypilot(home: Path, model: str, count: int) -> dict[str, Any]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
    }
    ran = subprocess.run(
        [sys.executable, "-c", _READ, model, str(count)],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    doc: dict[str, Any] = json.loads(ran.stdout.strip().splitlines()[-1])
    return doc


@pytest.mark.parametrize(("model", "count"), [("A6000", 4), ("H100", 8)])
def test_skypilot_reads_the_rendered_catalog_and_fetches_nothing(
    tmp_path: Path, model: str, count: int
) -> None:
    home = tmp_path / "server-home"
    for rel, text in _files(HostConfig(gpus={model: count})).items():
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_text(text)
    read = _read_with_skypilot(home, model, count)
    assert "error" not in read, read
    assert read["rows"] == [[model, "['Kubernetes']"]]
    assert read["exact"] == read["partial"] == read["any_cloud"] == model
    assert read["validated"] == {model: count}
    assert read["fetched"] == [] and read["meta"] == []  # never even looked at refreshing it


def test_without_the_catalog_skypilot_goes_to_the_network(tmp_path: Path) -> None:
    """The control: the same reads on an empty HOME try to download the catalog."""
    read = _read_with_skypilot(tmp_path, "A6000", 4)
    assert read["fetched"] and read["fetched"][0].endswith("/v8/common/accelerators.csv")
    assert "ConnectionError" in read["error"] and "no network in this test" in read["error"]


# ---------------------------------------------------------------------------------------------
# The real thing: a server from the rendered files, with no way out


class _Proxy(http.server.BaseHTTPRequestHandler):
    """Forwards nothing: records each request's target (a CONNECT's host:port, a URL) and
    answers 403."""

    seen: ClassVar[list[str]] = []

    def _refuse(self) -> None:
        type(self).seen.append(self.path)
        self.send_error(403, "no network on this test box")

    do_CONNECT = do_GET = do_POST = do_HEAD = _refuse

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the test reads `seen`
        pass


@contextlib.contextmanager
def _no_way_out() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    thread = threading.Thread(target=server.serve_forever, name="proxy", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _proxied(proxy: str) -> dict[str, str]:
    local = "127.0.0.1,localhost"  # the server, its controller and its clients talk here
    return {
        **{k: proxy for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
        **{k: local for k in ("NO_PROXY", "no_proxy")},
    }


class OfflineBox:
    def __init__(self, url: str, home: Path, host_config: Path, proxy: str, rendered: Path):
        self.url, self.home, self.host_config, self.proxy = url, home, host_config, proxy
        self.rendered = rendered  # the catalog as `setup render` wrote it

    @property
    def catalog(self) -> Path:
        return self.home / ACCELERATORS.removeprefix(SERVER_HOME.lstrip("/") + "/")

    def install_catalog(self) -> None:
        """What install.sh does, with the server running (it reads the file per request)."""
        self.catalog.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.rendered, self.catalog)

    def remove_catalog(self) -> None:
        self.catalog.unlink(missing_ok=True)

    def submit(
        self, tmp: Path, spec: str, *, wait_s: int = 240
    ) -> subprocess.CompletedProcess[str]:
        path = tmp / "spec.yaml"
        path.write_text(spec)
        client = tmp / "client-home"
        client.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPILOT_", "DESKGPU_"))}
        env.update(
            HOME=str(client),
            DESKGPU_CONFIG=str(self.host_config),
            SKYPILOT_API_SERVER_ENDPOINT=self.url,
            SKYPILOT_API_SERVER_LOCAL_PORT=self.url.rsplit(":", 1)[1],
            SKYPILOT_DISABLE_USAGE_COLLECTION="1",
            **_proxied(self.proxy),
        )
        return subprocess.run(
            [DESKGPU, "submit", "--wait", str(wait_s), str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=wait_s + 120,
        )

    def catalog_fetches(self, since: int) -> list[str]:
        return [t for t in _Proxy.seen[since:] if t.split(":")[0] in CATALOG_HOSTS]


@pytest.fixture(scope="module")
def offline_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OfflineBox]:
    tmp = tmp_path_factory.mktemp("offline")
    port = free_port()
    home, env, host_config = _rendered(tmp, port, guard=True, extra="gpus: {A6000: 4, H100: 8}\n")
    assert load_config(host_config).default_image  # so no job needs kubernetes/images.csv
    rendered = tmp / "rendered" / ACCELERATORS
    assert rendered.is_file()
    with _no_way_out() as proxy:
        extra = {**env, "SKYPILOT_API_SERVER_ENDPOINT": None, **_proxied(proxy)}
        with running_api_server(home, deploy=True, port=port, extra_env=extra) as url:
            yield OfflineBox(url, home, host_config, proxy, rendered)


SESSION = "name: dev\ngpus: A6000:1\ninteractive: true\n"
BATCH = "name: train\ngpus: H100:1\nrun: nvidia-smi\n"


@pytest.mark.apiserver
def test_without_the_catalog_an_offline_box_refuses_a_gpu_launch(
    offline_box: OfflineBox, tmp_path: Path
) -> None:
    """The control (and the error a researcher sees today): SkyPilot tries to download the
    catalog, the proxy is all it reaches, and deskgpu says so in one line."""
    offline_box.remove_catalog()
    since = len(_Proxy.seen)
    ran = offline_box.submit(tmp_path, SESSION)
    assert ran.returncode == 1, ran.stdout + ran.stderr
    said = "deskgpu: SkyPilot could not fetch its accelerator catalog (no network on the API "
    (line,) = [ln for ln in ran.stderr.splitlines() if ln.startswith(said)]
    assert "/catalogs/v8/common/accelerators.csv" in line and "Traceback" not in ran.stderr
    assert set(offline_box.catalog_fetches(since)) == {"raw.githubusercontent.com:443"}


@pytest.mark.apiserver
def test_with_the_rendered_catalog_a_session_gets_to_provisioning(
    offline_box: OfflineBox, tmp_path: Path
) -> None:
    offline_box.install_catalog()
    since = len(_Proxy.seen)
    ran = offline_box.submit(tmp_path, SESSION)
    # No Kubernetes here: provisioning's first step (an enabled infra) is as far as it gets.
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert "SkyPilot has no infrastructure enabled on the API server" in ran.stderr, ran.stderr
    assert "catalog" not in ran.stderr
    assert offline_box.catalog_fetches(since) == []
    assert offline_box.catalog.read_bytes() == offline_box.rendered.read_bytes()  # not replaced
    assert not list(offline_box.catalog.parent.parent.glob(".meta/**/*.md5"))


def _controller_log(home: Path, job_id: int) -> str:
    path = home / "sky_logs" / "jobs_controller" / f"{job_id}.log"
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.apiserver
@pytest.mark.skipif(shutil.which("rsync") is None, reason="SkyPilot's jobs launch needs rsync")
def test_with_the_rendered_catalog_a_managed_job_gets_to_provisioning(
    offline_box: OfflineBox, tmp_path: Path
) -> None:
    """Read three times on the way (the server's /validate and jobs launch, then the jobs
    controller's own launch in the server); none fetches."""
    offline_box.install_catalog()
    since = len(_Proxy.seen)
    ran = offline_box.submit(tmp_path, BATCH)
    out = ran.stdout + ran.stderr
    assert "catalog" not in out, out
    found = re.search(r"managed job (\d+)", out)
    assert found, out
    job_id = int(found.group(1))
    deadline = time.monotonic() + 240
    log = ""
    while time.monotonic() < deadline:
        log = _controller_log(offline_box.home, job_id)
        if "NoCloudAccessError" in log or "catalog" in log:
            break
        time.sleep(2)
    assert "NoCloudAccessError" in log, log[-3000:]
    assert "catalog" not in log.lower(), log[-3000:]
    assert offline_box.catalog_fetches(since) == []


# ---------------------------------------------------------------------------------------------
# install.sh, run for real (root: tests/test_install_sh.py's private mount namespace)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a private mount namespace")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare (util-linux)")
@pytest.mark.skipif(shutil.which("useradd") is None, reason="no useradd (passwd)")
def test_install_sh_installs_the_catalog_as_the_servers(tmp_path: Path) -> None:
    from tests.test_install_sh import _install_twice

    config = HostConfig(box_name="lab", gpus={"A6000": 4})
    result = _install_twice(tmp_path, config, {"objects": {}, "labels": {}, "enabled": []})
    _, lib = result["trees"]
    sky_dir = lib["skypilot/.sky"]
    owner = (sky_dir[1], sky_dir[2])
    assert owner != (0, 0)
    for path in [*catalog.directories("skypilot"), ACCELERATORS.removeprefix("var/lib/")]:
        mode, uid, gid, _ = lib[path]
        assert (uid, gid) == owner, path
        assert stat.S_IMODE(mode) == (0o644 if path.endswith(".csv") else 0o755), path


# ---------------------------------------------------------------------------------------------
# What a researcher reads when the catalog is missing

_HOSTED = "/skypilot-org/skypilot-catalog/master/catalogs/v8/common/accelerators.csv"


@pytest.mark.parametrize(
    "text",
    [
        # How the requests exception reads (a managed job's failure reason names it so).
        f"HTTPSConnectionPool(host='raw.githubusercontent.com', port=443): Max retries exceeded "
        f"with url: {_HOSTED} (Caused by NameResolutionError(...))",
        "HTTPSConnectionPool(host='skypilot-catalog.s3.us-east-1.amazonaws.com', port=443): "
        "Max retries exceeded with url: /catalogs/v8/common/accelerators.csv",
    ],
)
def test_a_catalog_connection_error_is_not_an_unreachable_server(text: str) -> None:
    """SkyPilot's ConnectionError from its catalog download once read as 'server unreachable'
    (the branch for it came after the one for any ConnectionError)."""
    from deskgpu.skypilot.sdk import explain_text

    said = str(explain_text("ConnectionError", text, "http://127.0.0.1:1"))
    assert said.startswith("SkyPilot could not fetch its accelerator catalog"), said
    assert "`deskgpu setup render` writes the box's own" in said
    assert "/catalogs/v8/common/accelerators.csv" in said
    plain = str(explain_text("ConnectionError", "Connection refused", "http://127.0.0.1:1"))
    assert "could not fetch" not in plain and "127.0.0.1:1" in plain
