"""What a newcomer trips on (an admin's and a researcher's first day), each test named after
what a trial of the docs reproduced."""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deskgpu.doctor.scheduled import Parsed, parse_args
from deskgpu.submission import SubmitResult


def _suggested(lines: list[str]) -> list[list[str]]:
    """The deskgpu commands a message tells the user to run."""
    found = []
    for line in lines:
        if "deskgpu " in line:
            words = shlex.split(line.split("deskgpu ", 1)[1])
            found.append(words)
    return found


@pytest.mark.parametrize(
    "result",
    [
        SubmitResult("alice-train", "batch", True, "r1", True, 7),
        SubmitResult("alice-train", "batch", True, "r1", False, None),
        SubmitResult("alice-dev", "interactive", False, "r2", False, None),
        SubmitResult("alice-dev", "interactive", False, "r2", True, None),
    ],
    ids=["job-accepted", "job-queued", "session-starting", "session-up"],
)
def test_submit_hints_name_deskgpus_own_commands_and_they_parse(result: SubmitResult) -> None:
    lines = result.follow_lines()
    assert not any(" sky " in f" {line} " for line in lines), lines  # no `sky jobs logs 1`
    commands = _suggested(lines)
    assert commands, lines
    for words in commands:
        assert isinstance(parse_args(words), Parsed), words  # the real CLI takes each one


def test_a_cpu_only_session_does_not_say_it_waits_for_gpus() -> None:
    cpu = SubmitResult("alice-dev", "interactive", False, "r", False, None, wants_gpus=False)
    assert "waits for free GPUs" not in " ".join(cpu.follow_lines())
    gpu = SubmitResult("alice-dev", "interactive", False, "r", False, None)
    assert "waits for free GPUs" in " ".join(gpu.follow_lines())


def test_escape_codes_from_skypilot_never_reach_the_queue(cli, tmp_path: Path) -> None:
    """`Run: \\x1b[1msky check\\x1b[0m` once showed in the Reason column and in --json."""
    from deskgpu.skypilot.sdk import parse_clusters, parse_jobs

    jobs = parse_jobs(
        [
            {
                "job_id": 3,
                "job_name": "alice-x",
                "status": "FAILED_PRECHECKS",
                "failure_reason": "Cloud access is not set up. Run: \x1b[1msky check\x1b[0m",
            }
        ]
    )
    assert jobs[0].reason is not None and "\x1b" not in jobs[0].reason
    assert "Run: sky check" in jobs[0].reason
    clusters = parse_clusters(
        [{"name": "alice-dev", "status": "INIT", "init_status_reason": "\x1b[33mpending\x1b[0m"}]
    )
    assert clusters[0].reason == "pending"


def test_the_queue_points_at_all_for_finished_jobs(cli) -> None:
    snap = Path(__file__).parent / "fixtures" / "snapshots" / "busy_box.json"
    result = cli("queue", "--snapshot", str(snap))
    assert result.exit_code == 0, result.stderr
    if "finished" in result.stdout:
        assert "(see --json)" not in result.stdout and "--all" in result.stdout


def test_help_shows_metavars_that_say_what_to_write(cli) -> None:
    for command in ("logs", "cancel", "ssh", "queue", "submit"):
        result = cli(command, "--help")
        assert result.exit_code == 0
        assert "range>" not in result.stdout, (command, result.stdout)


def test_ssh_help_does_not_talk_about_log_streams(cli) -> None:
    result = cli("ssh", "--help")
    assert "log stream" not in result.stdout


def test_the_data_dir_refusal_names_every_variable_deskgpu_sets(cli, tmp_path: Path) -> None:
    from deskgpu.config import HostConfig
    from deskgpu.house_rules import BATCH, DESKGPU_ENV, apply_house_rules

    spec = tmp_path / "job.yaml"
    spec.write_text("name: x\ngpus: 0\nenv: {DESKGPU_DATA_DIR: /x}\nrun: echo\n")
    result = cli("submit", str(spec), "--dry-run")
    assert result.exit_code == 2
    for name in DESKGPU_ENV:
        assert name in result.stderr
    shaped = apply_house_rules({"name": "x", "run": "echo"}, HostConfig(), "alice", BATCH)
    assert sorted(k for k in shaped["envs"] if k.startswith("DESKGPU_")) == sorted(DESKGPU_ENV)


def test_a_doctor_facts_file_given_to_queue_snapshot_says_what_it_is(cli) -> None:
    facts = Path(__file__).parent / "fixtures" / "doctor" / "healthy-4x-a6000.json"
    result = cli("queue", "--snapshot", str(facts))
    assert result.exit_code == 2
    assert "deskgpu.doctor/facts' document, not a queue snapshot" in result.stderr
    assert "schema_version None" not in result.stderr


def test_the_report_title_has_no_microseconds() -> None:
    from deskgpu.state import usage as store
    from deskgpu.state.history import open_history
    from deskgpu.usage import html
    from deskgpu.usage.report import build

    with open_history(":memory:") as h:
        store.ensure(h.db)
        shown = build(
            h.db, since=1767000000.123456, until=1767003600.5, threshold_pct=5, max_gap_s=1200
        )
        page = html.page(shown)
    title = page.split("</title>")[0]
    assert "deskgpu report 2025-12-29" in title and ".123456" not in title


def test_a_reserved_env_no_longer_hides_a_bad_workdir(cli, tmp_path: Path) -> None:
    """Every problem in one run: an `env.DESKGPU_USER` refusal once hid the bad workdir."""
    spec = tmp_path / "job.yaml"
    spec.write_text("name: x\ngpus: 0\nworkdir: ./missing\nenv: {DESKGPU_USER: me}\nrun: echo\n")
    result = cli("submit", str(spec), "--dry-run")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert [line.split(": ", 2)[1] for line in lines] == ["workdir", "env.DESKGPU_USER"]


def test_doctor_judges_the_configured_servers_config_not_another_users() -> None:
    """A researcher's private server on another port once decided `skypilot.admin_policy`."""
    from deskgpu.config import HostConfig
    from deskgpu.doctor.facts import ServerProcess
    from deskgpu.doctor.probes import endpoint_port, server_config_paths

    box = ServerProcess(pid=10, port=46580, home="/var/lib/skypilot")
    private = ServerProcess(pid=20, port=47123, home="/home/bob")
    port = endpoint_port("http://127.0.0.1:46580")
    assert port == 46580
    paths = server_config_paths(HostConfig(), [private, box], {}, port)
    assert paths == ["/var/lib/skypilot/.sky/config.yaml"]
    assert endpoint_port("not a url") is None


def test_the_catalog_error_keeps_its_whole_url() -> None:
    """`SkyPilot could not fetch its accelerator catalog ...: …` was once cut mid-URL."""
    from deskgpu.skypilot.sdk import explain

    url = "https://raw.githubusercontent.com/skypilot-org/skypilot-catalog/master/catalogs/v8/aws/vms.csv"

    class CloudError(Exception):
        pass

    text = str(
        explain(
            CloudError(f"Failed to fetch catalog: requests error: {url} " + "x" * 300),
            "http://127.0.0.1:1",
        )
    )
    assert url in text and "accelerator catalog" in text


def test_a_gpu_request_checked_against_nothing_says_so(cli, tmp_path: Path) -> None:
    """`gpus: A6000:16` once passed a dry run off the box without a word."""
    from deskgpu.nvml import NvmlView

    spec = tmp_path / "job.yaml"
    spec.write_text("name: big\ngpus: A6000:16\nrun: python train.py\n")
    config = tmp_path / "empty.yaml"
    config.write_text("")  # the built-in defaults: no inventory
    from deskgpu import submission

    original = submission.with_live_inventory

    def no_gpus(cfg, reader=None):  # type: ignore[no-untyped-def]
        return original(cfg, lambda: NvmlView(available=False, error="no NVIDIA driver"))

    submission.with_live_inventory = no_gpus  # this machine has no GPU either way
    try:
        result = cli("submit", str(spec), "--dry-run", "--config", str(config))
        cpu = tmp_path / "cpu.yaml"
        cpu.write_text("name: prep\ngpus: 0\nrun: python prep.py\n")
        quiet = cli("submit", str(cpu), "--dry-run", "--config", str(config))
    finally:
        submission.with_live_inventory = original
    assert result.exit_code == 0, result.stderr
    assert "the GPU request is not checked here" in result.stderr
    assert "not checked" not in quiet.stderr


# ---- item 5: a batch job that fails its prechecks is not "submitted" ----

SKY_FIXTURES = Path(__file__).parent / "fixtures" / "sky"
EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(scope="module")
def box_like_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real API server run as the box runs it (`--deploy`: the jobs controller inside the
    server), with no infrastructure enabled; a server that is not in consolidation mode
    refuses a managed job at once (tests/test_submit_live.py)."""
    from tests.apiserver import running_api_server

    home = tmp_path_factory.mktemp("first-day-server")
    with running_api_server(home, deploy=True, warm_up=True) as url:
        yield url


def _submit_to(server: str, spec: Path, hermetic: Any) -> subprocess.CompletedProcess[str]:
    """The real CLI's `submit SPEC` against `server`, in a subprocess (stdout and stderr apart).

    A first launch on a fresh server starts its controller's machinery: on a loaded 2-core
    machine that has taken over a minute. Only a failure to fail waits out `--wait 300`."""
    return subprocess.run(
        [sys.executable, "-m", "deskgpu", "submit", str(spec), "--wait", "300"],
        capture_output=True,
        text=True,
        env=hermetic.subprocess_env(SKYPILOT_API_SERVER_ENDPOINT=server),
        timeout=400,
    )


@pytest.mark.apiserver
def test_a_batch_job_that_fails_its_prechecks_exits_1_with_skypilots_reason(
    box_like_server: str, tmp_path: Path, hermetic
) -> None:
    """`managed job 1 submitted`, exit 0, and FAILED_PRECHECKS seconds later (issue #24 item 5):
    the interactive submit to the same server already exited 1."""
    spec = tmp_path / "job.yaml"
    spec.write_text("name: job\ngpus: 0\nrun: echo hi\n")
    result = _submit_to(box_like_server, spec, hermetic)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "-job failed before it started (FAILED_PRECHECKS)" in line, line
    assert "no infrastructure enabled" in line and "sky check" in line
    assert "\x1b" not in line


def test_skypilots_upload_progress_goes_to_stderr_without_escape_codes(
    box_like_server: str, tmp_path: Path, hermetic
) -> None:
    """A job with a workdir is uploaded first: SkyPilot's loggers print its progress on the
    stdout they found at import, in colour. In a pipe, deskgpu's stdout stays the product and
    the progress reaches stderr as words."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text("print('hi')\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: job\ngpus: 0\nworkdir: {work}\nrun: python train.py\n")
    result = _submit_to(box_like_server, spec, hermetic)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Files uploaded" in result.stderr, result.stderr
    assert "\x1b" not in result.stderr


def test_a_recorded_prechecks_failure_is_exit_1_and_names_the_job(cli, sky_replay) -> None:
    """The same, replayed (tests/fixtures/sky/jobs-launch-failed-prechecks.json): the job was
    taken (PENDING, STARTING), then failed; one line, nothing on stdout, not even --json."""
    sky_replay.load(SKY_FIXTURES / "jobs-launch-failed-prechecks.json")
    result = cli("submit", str(EXAMPLES / "cpu-only.yaml"), "--json")
    assert result.exit_code == 1, result.stdout
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("deskgpu: managed job 1 ") and "(FAILED_PRECHECKS)" in line
    assert "SkyPilot has no infrastructure enabled on the API server at" in line


@pytest.mark.parametrize(
    ("record", "state"),
    [
        (
            {
                "status": "PENDING",
                "schedule_state": "WAITING",
                "details": "Waiting for other jobs to launch",
            },
            None,
        ),
        ({"status": "STARTING", "schedule_state": "LAUNCHING"}, None),
        (
            {
                "status": "PENDING",
                "schedule_state": "ALIVE",
                "details": "Job submitted to queue",
            },
            None,
        ),
        ({"status": "PENDING", "schedule_state": "LAUNCHING"}, None),
        (
            {
                "status": "STARTING",
                "schedule_state": "LAUNCHING",
                "cluster_name_on_cloud": "alice-train-7-2ea4",
            },
            "Starting",
        ),
        ({"status": "STARTING", "schedule_state": "ALIVE_BACKOFF"}, "Queued"),
        (
            {
                "status": "PENDING",
                "schedule_state": "ALIVE_BACKOFF",
                "details": "Job is in backoff",
            },
            "Queued",
        ),
        ({"status": "RUNNING", "schedule_state": "ALIVE"}, "Running"),
        (
            {
                "status": "FAILED_PRECHECKS",
                "schedule_state": "DONE",
                "failure_reason": "[sky.exceptions.NoCloudAccessError] x",
            },
            "Failed",
        ),
    ],
    ids=[
        "controller-queue",
        "launching",
        "claimed-pending",
        "launching-pending",
        "provisioning",
        "backoff",
        "backoff-pending",
        "running",
        "failed-prechecks",
    ],
)
def test_a_launch_is_judged_only_once_it_shows_its_hand(
    record: dict[str, str], state: str | None
) -> None:
    """PENDING and a launch before its cluster exists can still fail its prechecks; a
    provisioning cluster, a backoff (waiting for GPUs) or a running job cannot."""
    from deskgpu.skypilot.sdk import launch_state

    assert launch_state({"job_id": 7, "task_id": 0, **record}).state == state


def test_a_queued_batch_job_still_exits_0_and_says_so() -> None:
    queued = SubmitResult(
        "alice-train", "batch", True, "r", True, 7, state="Queued", reason="Job is in backoff"
    )
    assert queued.exit_status == 0
    assert (
        queued.follow_lines()[0]
        == "alice-train: managed job 7 submitted, queued (Job is in backoff)"
    )
    assert queued.as_json()["state"] == "Queued"


# ---- item 12: the usage report's heat-map, sessions table and the time before observe ----


def _report_of(tmp_path: Path, name: str = "long_idle_debug_session", **window: float) -> object:
    """The report of a reap-corpus scenario's history (tests/test_report.py's helpers)."""
    from tests.fixtures.reap import make_corpus
    from tests.test_report import build, history_from, scenario

    path = tmp_path / "history.sqlite"
    history_from(scenario(name), path)
    since = window.get("since", make_corpus.NOW - 7 * 86400)
    return build(path, since, window.get("until", make_corpus.NOW + 1))


def _chromium_layout(page: str, tmp_path: Path) -> list[tuple[str, str, float, float]]:
    """(svg id, text, right edge of the text as laid out, svg width) for every SVG text of
    `page`, measured by headless Chromium (getBBox)."""
    import html as htmllib
    import json
    import re
    import shutil

    probe = (
        "<script>const out=[];for(const s of document.querySelectorAll('svg')){"
        "const w=s.width.baseVal.value;for(const t of s.querySelectorAll('text')){"
        "const b=t.getBBox();out.push([s.id,t.textContent,b.x+b.width,w]);}}"
        "document.title=JSON.stringify(out);</script>"
    )
    out = tmp_path / "layout.html"
    out.write_text(page.replace("</body>", probe + "</body>"))
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium is not None
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", out.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r"<title>(.*?)</title>", dom.stdout, re.S)
    assert found, dom.stdout[:500]
    return [tuple(row) for row in json.loads(htmllib.unescape(found.group(1)))]


def test_the_heatmaps_last_date_label_is_not_clipped(tmp_path: Path) -> None:
    """A week's report ends one hour past the last day's first hour: its date label once ran
    60 px past the SVG's right edge. Every text of the page's SVGs fits, by the drawing's own
    bound and, where Chromium is installed, as Chromium lays it out."""
    import re
    import shutil

    from deskgpu.usage import html

    shown = _report_of(tmp_path)
    page = html.page(shown)  # type: ignore[arg-type]
    svg = page.split('<svg id="heatmap"', 1)[1].split("</svg>", 1)[0]
    width = float(re.search(r'width="(\d+)"', svg).group(1))  # type: ignore[union-attr]
    texts = re.findall(r'<text x="([\d.]+)"[^>]*>([^<]*)</text>', svg)
    assert texts and texts[-1][1] != "GPU 0"
    for x, text in texts:
        assert float(x) + html.text_width(text) <= width, (text, x, width)
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        laid_out = _chromium_layout(page, tmp_path)
        dates = [row for row in laid_out if row[0] == "heatmap" and row[1][:2] == "20"]
        assert len(dates) == 7, dates  # seven days, the last one too
        for svg_id, text, right, svg_width in laid_out:
            assert right <= svg_width, (svg_id, text, right, svg_width)


def test_the_sessions_gpus_column_counts_and_on_gpu_names_the_indices(tmp_path: Path) -> None:
    """`GPUS 2` was GPU 2 (an index, not a count)."""
    from deskgpu.usage.report import text_lines

    shown = _report_of(tmp_path)
    lines = text_lines(shown)  # type: ignore[arg-type]
    header = next(line for line in lines if line.startswith("SESSION"))
    row = lines[lines.index(header) + 1]
    names = header.split()
    gpus, on_gpu = row.split()[names.index("GPUS")], row.split()[names.index("ON_GPU")]
    assert (gpus, on_gpu) == ("1", "2")  # one GPU, nvidia-smi's index 2


def test_time_before_the_first_observation_is_not_called_a_gap(tmp_path: Path) -> None:
    """A history with no observation yet (observe not run, or a window before it) once read
    as one whole gap: `1 gap(s) in the history`, hatched."""
    from deskgpu.state import usage as store
    from deskgpu.state.history import open_history
    from deskgpu.usage import html
    from deskgpu.usage.report import build, text_lines
    from tests.fixtures.reap import make_corpus

    with open_history(":memory:") as h:
        store.ensure(h.db)
        empty = build(h.db, since=1767000000.0, until=1767007200.0, threshold_pct=5, max_gap_s=1200)
    assert empty.gaps == [] and empty.observed_s == 0
    assert not any("gap" in line for line in text_lines(empty))
    assert any("no observation yet" in note for note in empty.notes)
    page = html.page(empty)
    assert 'class="cell gap"' not in page and ">not yet observed</text>" in page

    earlier = _report_of(
        tmp_path, since=make_corpus.NOW - 30 * 86400, until=make_corpus.NOW - 20 * 86400
    )
    assert earlier.gaps == []  # type: ignore[attr-defined]
    assert 'class="cell gap"' not in html.page(earlier)  # type: ignore[arg-type]


# ---- item 2: a --python the API server's account cannot run ----


def _program_at(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def _venv_on_a_base_python_under(world: Path, home_mode: int) -> tuple[Path, Path]:
    """`uv venv /opt/deskgpu` on a pyenv Python: the venv's bin/python links into
    `<home>/.pyenv/versions/3.11.7/bin/python3.11`; returns (the venv's python, the home)."""
    home = world / "root"
    base = _program_at(home / ".pyenv/versions/3.11.7/bin/python3.11")
    for directory in base.parents[: len(base.relative_to(world).parts) - 1]:
        directory.chmod(0o755)  # whatever the umask: only `home` is closed
    home.chmod(home_mode)
    venv = world / "opt/deskgpu"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(f"home = {base.parent}\n")
    (venv / "bin/python").symlink_to(base)
    _program_at(venv / "bin/deskgpu")
    for directory in (venv, venv.parent, venv / "bin"):
        directory.chmod(0o755)
    return venv / "bin/python", home


def test_a_venv_whose_base_python_is_under_a_0700_home_is_refused_naming_the_account(
    cli, tmp_path: Path, world_tmp: Path
) -> None:
    """`uv venv /opt/deskgpu` on root's pyenv Python was rendered into the server's unit,
    which its `skypilot` account could not run (issue #24 item 2)."""
    python, home = _venv_on_a_base_python_under(world_tmp, 0o700)
    out = tmp_path / "out"
    result = cli("setup", "render", "--out", str(out), "--python", str(python))
    assert result.exit_code == 2, result.stdout + result.stderr
    assert result.stdout == "" and not out.exists()
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"--python {python}: the API server's account skypilot")
    assert f"may not search {home} (drwx------ " in line
    assert "/usr/bin/python3 (docs/setup.md step 3)" in line
    assert "--python /opt/deskgpu/bin/python" in line

    home.chmod(0o755)  # the same layout, every directory open: accepted
    assert cli("setup", "render", "--out", str(out), "--python", str(python)).exit_code == 0


def test_the_server_account_is_judged_by_its_own_uid_when_it_exists(
    cli, tmp_path: Path, world_tmp: Path
) -> None:
    """The account named in the host config (`doctor.api_server_user`) decides: root may
    search a 0700 directory, `nobody` may not."""
    import pwd

    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no `nobody` account here")
    python, home = _venv_on_a_base_python_under(world_tmp, 0o700)
    for account, code in (("root", 0), ("nobody", 2)):
        config = tmp_path / f"{account}.yaml"
        config.write_text(f"doctor:\n  api_server_user: {account}\n")
        args = ["--out", str(tmp_path / account), "--python", str(python), "--config", str(config)]
        result = cli("setup", "render", *args)
        assert result.exit_code == code, (account, result.stderr)
        if code:
            assert f"account nobody cannot run it: it may not search {home}" in result.stderr
            assert "not created yet" not in result.stderr


def test_execute_bits_are_judged_by_the_first_class_that_matches() -> None:
    """The check reads mode bits as the kernel does: the first class that matches decides,
    the owner's, then the group's, then the others' (an owner without the bit is refused
    even where others have it); an account not created yet has the others' bits."""
    import os
    import stat

    from deskgpu.setup.tools import Account

    def mode(bits: int, uid: int = 0, gid: int = 0) -> os.stat_result:
        return os.stat_result((stat.S_IFREG | bits, 0, 0, 1, uid, gid, 0, 0, 0, 0))

    anyone = Account("skypilot")  # not created yet
    member = Account("skypilot", uid=990, gids=frozenset({990, 50}))
    assert anyone.may_execute(mode(0o755)) and not anyone.may_execute(mode(0o750))
    assert member.may_execute(mode(0o750, gid=50)) and not member.may_execute(mode(0o705, gid=50))
    assert member.may_execute(mode(0o700, uid=990)) and not member.may_execute(mode(0o077, uid=990))
    root = Account("root", uid=0)
    assert root.may_execute(mode(0o100)) and not root.may_execute(mode(0o644))
