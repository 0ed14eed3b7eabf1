"""Doctor proves what it claims about the schedules: scheduled commands are judged by deskgpu's own
CLI, the files and fixes come from `deskgpu setup render`, and the box's records prove that
observation and the weekly reap really run."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from deskgpu.config import HostConfig, load_config
from deskgpu.doctor import probes
from deskgpu.doctor.checks import FAIL, OK, SKIP, WARN, Check, run_checks
from deskgpu.doctor.facts import ExecutableFact, FileFact, HostFacts
from deskgpu.doctor.registry import BY_ID, REGISTRY, readme_table
from deskgpu.doctor.scheduled import Parsed, find_scheduled, parse_args
from deskgpu.setup.render import Tools, render, write
from deskgpu.setup.schedules import CRON_FILE, OBSERVE, REAP
from deskgpu.state.history import SessionSample, open_history
from tests.conftest import ROOT
from tests.fixtures.doctor import from_render
from tests.test_doctor_checks import FIXTURES, box_config, by_id, facts

CHECKS_SRC = ROOT / "src" / "deskgpu" / "doctor" / "checks"


def judge(recorded: HostFacts, config: HostConfig | None = None) -> dict[str, Check]:
    return by_id(run_checks(recorded, config or box_config()))


def with_cron(recorded: HostFacts, text: str, path: str = "/etc/cron.d/deskgpu") -> HostFacts:
    """The recorded box, its deskgpu schedules replaced by one cron file."""
    recorded.files = {
        k: v for k, v in recorded.files.items() if "deskgpu" not in k or k == "cron_spool"
    }
    recorded.files[f"cron:{path}"] = FileFact(path=path, exists=True, text=text)
    return recorded


# -- the issue's own case ------------------------------------------------------------------------


def test_cron_running_reap_observe_fails_observe_scheduled_with_the_rendered_line() -> None:
    """`deskgpu reap --observe` is "No such option": observation never runs, so doctor fails."""
    recorded = with_cron(
        facts("k3s-node-without-gpus.json"),
        "PATH=/opt/deskgpu/bin:/usr/bin:/bin\n"
        "*/10 * * * * root /opt/deskgpu/bin/deskgpu reap --observe >>/var/log/x.log 2>&1\n"
        "0 3 * * 0  root  deskgpu reap --yes --quiet\n",
    )
    found = judge(recorded)
    check = found["operations.observe_scheduled"]
    assert check.status == FAIL
    assert "No such option: --observe" in check.detail
    assert check.fix is not None and f"`{OBSERVE.cron_line()}`" in check.fix
    assert found["operations.observe_fresh"].status == SKIP  # needs the schedule
    assert found["operations.reap_scheduled"].status == OK  # the other line is fine


def test_the_old_healthy_fixture_line_is_refused_by_the_real_cli() -> None:
    assert parse_args(["reap", "--observe"]) == "No such option: --observe"
    assert isinstance(parse_args(["observe", "--quiet"]), Parsed)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("0 3 * * 0 root deskgpu reap --quiet", "different job"),  # a dry run reaps nothing
        ("0 3 * * 0 root deskgpu reap --yes --evidence /tmp/e.json", "different job"),
        ("0 3 * * 0 root deskgpu reap --yes extra", "unexpected extra argument"),
        ("0 3 * * 0 root deskgpu reap --yes --help", "only prints help"),
        ("0 3 * * 0 root /usr/local/bin/deskgpu reap --yes", "/usr/local/bin/deskgpu does not"),
        ("0 3 * * 0 root deskgpu-old reap --yes", "no cron line"),
        ("0 3 * * 0 deskgpu reap --yes", "no cron line"),  # no user field: `deskgpu` is the user
        # Debian's idiom for "only where systemd does not run": it does here.
        ("0 3 * * 0 root test -e /run/systemd/system || deskgpu reap --yes", "skips it where"),
    ],
)
def test_a_reap_line_that_does_not_reap_fails(line: str, why: str) -> None:
    recorded = with_cron(
        facts("k3s-node-without-gpus.json"),
        f"PATH=/opt/deskgpu/bin:/usr/bin:/bin\n{OBSERVE.cron_line()}\n{line}\n",
    )
    recorded.executables["/usr/local/bin/deskgpu"] = ExecutableFact("/usr/local/bin/deskgpu")
    check = judge(recorded)["operations.reap_scheduled"]
    assert check.status == FAIL, check
    assert why in check.detail
    assert check.fix is not None and REAP.cron_line() in check.fix


@pytest.mark.parametrize(
    "line",
    [
        "0 3 * * 0 root deskgpu reap --yes",
        "0 3 * * 0 root /opt/deskgpu/bin/deskgpu reap --quiet --yes --json >>/var/log/r 2>&1",
        "0 3 * * 0 root nice -n 10 deskgpu reap --yes",
        "0 3 * * 0 root sh -c 'cd / && deskgpu reap --yes --quiet'",
        "@weekly root deskgpu reap --yes",
    ],
)
def test_reap_lines_that_do_reap_count(line: str) -> None:
    recorded = with_cron(
        facts("k3s-node-without-gpus.json"),
        f"PATH=/opt/deskgpu/bin:/usr/bin:/bin\n{OBSERVE.cron_line()}\n{line}\n",
    )
    assert judge(recorded)["operations.reap_scheduled"].status == OK


def test_a_program_that_is_not_executable_does_not_count() -> None:
    recorded = facts("k3s-node-without-gpus.json")
    for fact in recorded.executables.values():
        fact.executable = False
    check = judge(recorded)["operations.observe_scheduled"]
    assert check.status == FAIL
    assert "no executable `deskgpu` on its PATH" in check.detail


def test_facts_that_never_looked_at_the_program_do_not_count() -> None:
    recorded = facts("k3s-node-without-gpus.json")
    recorded.executables = {}
    check = judge(recorded)["operations.reap_scheduled"]
    assert check.status == FAIL
    assert "was not looked at" in check.detail


def test_both_timers_and_cron_is_two_reaps_and_warns() -> None:
    recorded = facts("healthy-4x-a6000.json")  # the rendered timers
    cron_box = facts("k3s-node-without-gpus.json")  # the rendered cron file
    recorded.files[f"cron:{CRON_FILE}"] = cron_box.files[f"cron:{CRON_FILE}"]
    recorded.executables.update(cron_box.executables)
    check = judge(recorded)["operations.reap_scheduled"]
    assert check.status == WARN
    assert "runs 2 times over" in check.detail and check.fix is not None
    assert "keep one" in check.fix


def test_systemd_that_is_not_running_never_fires_a_timer() -> None:
    recorded = facts("healthy-4x-a6000.json")
    timers = recorded.commands["systemctl_timers"]
    timers.returncode, timers.stdout = 1, ""
    timers.stderr = "System has not been booted with systemd as init system (PID 1). Can't operate."
    check = judge(recorded)["operations.observe_scheduled"]
    assert check.status == FAIL
    assert "systemd is not running here" in check.detail


def test_systemd_that_does_not_answer_is_not_proof_either_way() -> None:
    recorded = facts("healthy-4x-a6000.json")
    timers = recorded.commands["systemctl_timers"]
    timers.returncode, timers.stdout, timers.timed_out = None, "", True
    check = judge(recorded)["operations.observe_scheduled"]
    assert check.status == WARN
    assert "could not ask systemd" in check.detail


# -- proof from the box's records ----------------------------------------------------------------


def test_an_enabled_timer_with_a_day_old_history_fails_observe_fresh(tmp_path: Path) -> None:
    config = box_config(state_dir=str(tmp_path))
    recorded = facts("healthy-4x-a6000.json")
    with open_history(tmp_path / "history.sqlite") as history:
        history.append(recorded.gathered_at - 86400, [SessionSample("alice-dbg", (), 0, None)])
    recorded.records = probes.probe_records(config)  # the real probe on a real history
    assert recorded.records.history_latest == int(recorded.gathered_at - 86400)
    check = judge(recorded, config)["operations.observe_fresh"]
    assert check.status == FAIL
    assert "is 1d old" in check.detail and "reap.max_sample_gap" in check.detail
    assert check.fix is not None and "deskgpu-observe.service" in check.fix


def test_no_history_at_all_fails_observe_fresh(tmp_path: Path) -> None:
    config = box_config(state_dir=str(tmp_path))
    recorded = facts("healthy-4x-a6000.json")
    recorded.records = probes.probe_records(config)
    check = judge(recorded, config)["operations.observe_fresh"]
    assert (check.status, "observe never ran" in check.detail) == (FAIL, True)


def test_a_file_that_is_not_a_history_fails_observe_fresh(tmp_path: Path) -> None:
    config = box_config(state_dir=str(tmp_path))
    (tmp_path / "history.sqlite").write_text("not sqlite")
    recorded = facts("healthy-4x-a6000.json")
    recorded.records = probes.probe_records(config)
    check = judge(recorded, config)["operations.observe_fresh"]
    assert check.status == FAIL and "cannot read the history" in check.detail


def test_a_fresh_history_is_ok(tmp_path: Path) -> None:
    config = box_config(state_dir=str(tmp_path))
    recorded = facts("healthy-4x-a6000.json")
    with open_history(tmp_path / "history.sqlite") as history:
        history.append(recorded.gathered_at - 240, [])
    recorded.records = probes.probe_records(config)
    assert judge(recorded, config)["operations.observe_fresh"].status == OK


def test_reap_ran_reads_the_audit_log_a_real_reap_run_writes(tmp_path: Path) -> None:
    """The audit log's `run` line (tests/test_reap_live.py checks a real run writes it)."""
    config = box_config(state_dir=str(tmp_path))
    recorded = facts("healthy-4x-a6000.json")
    audit = tmp_path / "reap-audit.jsonl"
    audit.write_text("")
    recorded.records = probes.probe_records(config)
    check = judge(recorded, config)["operations.reap_ran"]
    assert check.status == WARN and "no `reap --yes` run yet" in check.detail
    nine_days = recorded.gathered_at - 9 * 86400
    from deskgpu.reap.evidence import iso

    lines = [
        {"ts": iso(nine_days), "run_id": "old-1", "event": "run", "actor": "root"},
        {"ts": iso(nine_days + 60), "run_id": "observe-x", "event": "action", "actor": "observe"},
    ]
    audit.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{torn")
    recorded.records = probes.probe_records(config)
    check = judge(recorded, config)["operations.reap_ran"]
    assert check.status == WARN and "old-1" in check.detail and "9d" in check.detail
    with audit.open("a") as f:
        f.write("\n" + json.dumps({"ts": iso(recorded.gathered_at - 3600), "run_id": "new-2",
                                   "event": "run", "actor": "root"}) + "\n")  # fmt: skip
    recorded.records = probes.probe_records(config)
    check = judge(recorded, config)["operations.reap_ran"]
    assert check.status == OK and "new-2" in check.detail


# -- the files doctor accepts are the files setup renders ----------------------------------------


@pytest.fixture
def rendered_box(tmp_path: Path) -> tuple[Path, HostConfig]:
    """The rendered tree whose programs are real: this interpreter and its `deskgpu` script."""
    deskgpu = Path(sys.executable).with_name("deskgpu")
    if not deskgpu.is_file():
        pytest.skip(f"no deskgpu console script next to {sys.executable}")
    box = load_config(FIXTURES / "host-config.yaml")
    config = dataclasses.replace(box, state_dir=str(tmp_path))
    out = tmp_path / "box"
    write(render(config, Tools(sys.executable, str(deskgpu))), out)
    return out, config


def _probe(out: Path, config: HostConfig, *, cron: bool, units: bool) -> HostFacts:
    paths = probes.ProbePaths(
        cron_files=(str(out / "cron" / "*"),) if cron else (),
        cron_spool=str(out / "no-spool"),
        systemd_units=(str(out / "etc/systemd/system/*"),) if units else (),
    )
    commands, files = probes.probe_schedules(paths, 2.0)
    if cron:  # cron reads it as /etc/cron.d/deskgpu: the system format, with a user field
        text = files.pop(f"cron:{out}/cron/deskgpu").text
        files[f"cron:{out}/etc/cron.d/deskgpu"] = FileFact(CRON_FILE, True, text)
    scheduled = find_scheduled(files)
    recorded = facts("healthy-4x-a6000.json")
    recorded.files = files
    recorded.commands.update(commands)
    recorded.executables = probes.probe_executables([c for e in scheduled for c in e.candidates])
    return recorded


def test_doctor_accepts_the_rendered_cron_file(rendered_box) -> None:
    out, config = rendered_box
    found = judge(_probe(out, config, cron=True, units=False), config)
    assert found["operations.observe_scheduled"].status == OK
    assert found["operations.reap_scheduled"].status == OK


def test_doctor_accepts_the_rendered_units_when_their_timers_are_active(rendered_box) -> None:
    out, config = rendered_box
    recorded = _probe(out, config, cron=False, units=True)
    recorded.commands["systemctl_timers"].returncode = 0
    recorded.commands["systemctl_timers"].missing = False
    recorded.commands["systemctl_timers"].stdout = from_render.timers_stdout("")
    found = judge(recorded, config)
    assert found["operations.observe_scheduled"].status == OK, found["operations.observe_scheduled"]
    assert found["operations.reap_scheduled"].status == OK


def test_the_rendered_programs_really_run(rendered_box) -> None:
    """The `deskgpu` the rendered files name answers to the scheduled arguments' help."""
    import subprocess

    out, _ = rendered_box
    (entry, *_) = find_scheduled(
        {
            "systemd:x": FileFact(
                "x.service", True, (out / f"etc/systemd/system/{REAP.service}").read_text()
            )
        }
    )
    done = subprocess.run(
        [entry.program, *entry.args[:1], "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--yes" in done.stdout


@pytest.mark.parametrize("name", from_render.HAND_BUILT)
def test_fixtures_hold_what_setup_renders(name: str) -> None:
    """Regenerate with `uv run python -m tests.fixtures.doctor.from_render`, never by hand."""
    doc = json.loads((FIXTURES / name).read_text())
    assert doc == from_render.regenerate(FIXTURES / name)


# -- every fix doctor gives is a command that works ----------------------------------------------


def _all_fixes() -> set[str]:
    """The fixes doctor gives on every fixture and on each broken variant above."""
    fixes: set[str] = set()
    variants = [facts(p.name) for p in FIXTURES.glob("*.json")]
    bad = with_cron(facts("k3s-node-without-gpus.json"), "* * * * * root deskgpu reap --observe\n")
    stale = facts("healthy-4x-a6000.json")
    assert stale.records is not None
    stale.records.history_latest = stale.gathered_at - 86400
    stale.records.audit_last_reap = stale.gathered_at - 30 * 86400
    inactive = facts("healthy-4x-a6000.json")
    inactive.commands["systemctl_timers"].stdout = ""
    variants += [bad, stale, inactive]
    for recorded in variants:
        for check in run_checks(recorded, box_config()):
            if check.fix:
                fixes.add(check.fix)
    return fixes


def _deskgpu_commands(text: str) -> list[list[str]]:
    """Each `deskgpu ...` in backticks, split into its words (`sudo` and `&&` tails dropped)."""
    out = []
    for quoted in re.findall(r"`([^`]*)`", text):
        for part in re.split(r"&&|\|\||;|\|", quoted):
            words = shlex.split(part)
            if words[:1] == ["sudo"]:
                words = words[1:]
            if words[:1] == ["deskgpu"]:
                out.append(words[1:])
    return out


def test_every_deskgpu_command_in_any_fix_parses_against_the_cli() -> None:
    fixes = _all_fixes()
    commands = [c for fix in fixes for c in _deskgpu_commands(fix)]
    assert len(commands) >= 8  # setup render, observe, reap --yes, doctor --record, ...
    for words in commands:
        assert isinstance(parse_args(words), Parsed), (words, parse_args(words))


def _literal_texts(tree: ast.AST) -> list[str]:
    """Every string literal outside docstrings; an f-string with `{}` for each placeholder."""
    skip = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}  # docstrings
    texts = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
            texts.append(
                "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            )
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.append(node.value)
    return texts


def test_every_deskgpu_command_written_in_the_checks_parses_against_the_cli() -> None:
    """The literal text of every check module, including fixes no fixture reaches."""
    seen: set[tuple[str, ...]] = set()
    for source in CHECKS_SRC.glob("*.py"):
        for text in _literal_texts(ast.parse(source.read_text())):
            for words in _deskgpu_commands(text):
                if not any("{" in w for w in words):
                    parsed = parse_args(words)
                    assert isinstance(parsed, Parsed), (source.name, words, parsed)
                    seen.add(parsed.command)
    assert {("doctor",), ("observe",), ("reap",)} <= seen


def test_no_fix_binds_a_server_beyond_loopback() -> None:
    for fix in _all_fixes():
        assert "sky api start --deploy" not in fix
        assert "0.0.0.0" not in fix


def test_a_shared_server_listening_on_every_interface_fails() -> None:
    recorded = facts("healthy-4x-a6000.json")
    (proc,) = recorded.sky.processes
    proc.cmdline = proc.cmdline.replace("--host 127.0.0.1", "--host 0.0.0.0")
    check = judge(recorded)["skypilot.shared_server"]
    assert check.status == FAIL and "listens on 0.0.0.0" in check.detail
    assert check.fix is not None and "skypilot-api.service" in check.fix


def test_the_schedule_fix_is_the_generators_own_text() -> None:
    check = judge(with_cron(facts("k3s-node-without-gpus.json"), ""))["operations.reap_scheduled"]
    texts = from_render.rendered_files()
    assert check.fix is not None
    line = re.search(r"its line: `([^`]*)`", check.fix)
    assert line and line.group(1) in texts[CRON_FILE].splitlines()


# -- the registry ----------------------------------------------------------------------------------


def test_every_check_a_component_makes_is_registered_and_every_registered_one_is_made() -> None:
    from deskgpu.doctor.checks import evaluate

    for path in FIXTURES.glob("*.json"):
        made = evaluate(facts(path.name), box_config(), box_config().doctor)
        assert set(made) <= set(BY_ID), set(made) - set(BY_ID)
        for check in run_checks(facts(path.name), box_config()):
            assert "not evaluated" not in check.detail, (path.name, check)


def test_needs_point_backwards_so_one_pass_cascades() -> None:
    order = {spec.id: i for i, spec in enumerate(REGISTRY)}
    for spec in REGISTRY:
        for need in spec.needs:
            assert order[need] < order[spec.id], (spec.id, need)


def test_a_failed_prerequisite_skips_what_needs_it_saying_which() -> None:
    recorded = facts("healthy-4x-a6000.json")
    recorded.nvml.available, recorded.nvml.error = False, "NVML Shared Library Not Found"
    found = judge(recorded)
    assert found["driver.nvml"].status == FAIL
    for dependent in ("driver.gpus", "driver.persistence", "driver.ecc", "driver.thermal"):
        assert found[dependent].status == SKIP
        assert found[dependent].detail == "needs driver.nvml to pass; it is fail"


def test_doctor_skip_cascades_too() -> None:
    found = judge(facts("healthy-4x-a6000.json"), box_config(doctor={"skip": ["kubernetes.nodes"]}))
    assert found["kubernetes.nodes"].detail == "skipped by doctor.skip in the host config"
    assert found["kubernetes.gpu_labels"].detail == "needs kubernetes.nodes to pass; it is skip"


def test_doctor_docs_check_table_is_the_registrys() -> None:
    doc = (ROOT / "docs" / "doctor.md").read_text()
    assert readme_table() in doc, "regenerate: uv run python -m deskgpu.docs"


# -- what an attacker's review found: each a way doctor said ok while nothing ran ------------------

UNIT = "/etc/systemd/system/deskgpu-observe.service"
TIMER = "/etc/systemd/system/deskgpu-observe.timer"


def _observe_with_unit(text: str | None = None, timer: str | None = None, **extra: str) -> Check:
    recorded = facts("healthy-4x-a6000.json")  # the rendered timers, active
    if text is not None:
        recorded.files[f"systemd:{UNIT}"] = FileFact(UNIT, True, text)
    if timer is not None:
        recorded.files[f"systemd:{TIMER}"] = FileFact(TIMER, True, timer)
    for path, body in extra.items():
        recorded.files[f"systemd:{path}"] = FileFact(path, True, body)
    return judge(recorded)["operations.observe_scheduled"]


def _rendered_unit() -> str:
    return from_render.rendered_files()[UNIT]


def test_a_stopped_timer_listed_without_a_next_run_does_not_count() -> None:
    recorded = facts("healthy-4x-a6000.json")
    timers = recorded.commands["systemctl_timers"]
    timers.stdout = re.sub(
        r"^.*deskgpu-observe\.timer.*$",
        "-   -   -   -  deskgpu-observe.timer deskgpu-observe.service",
        timers.stdout,
        flags=re.M,
    )
    check = judge(recorded)["operations.observe_scheduled"]
    assert check.status == FAIL and "shows no next run" in check.detail


@pytest.mark.parametrize(
    ("running", "status"),
    [(False, FAIL), (None, WARN), (True, OK)],
    ids=["stopped", "unknown", "up"],
)
def test_a_cron_line_counts_only_while_a_cron_daemon_runs(
    running: bool | None, status: str
) -> None:
    recorded = facts("k3s-node-without-gpus.json")  # the rendered cron file
    recorded.cron_running = running
    assert judge(recorded)["operations.observe_scheduled"].status == status


def test_the_cron_daemon_probe_reads_proc(tmp_path: Path) -> None:
    for pid, comm in ((1, "systemd"), (412, "cron")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
    assert probes.probe_cron_running(str(tmp_path)) is True
    (tmp_path / "412" / "comm").write_text("sshd\n")
    assert probes.probe_cron_running(str(tmp_path)) is False
    assert probes.probe_cron_running(str(tmp_path / "hidden")) is None  # no PID 1 visible


CRON_LINE = OBSERVE.cron_line()
GOOD_CRON = f"PATH=/opt/deskgpu/bin:/usr/bin:/bin\n{CRON_LINE}\n"


@pytest.mark.parametrize(
    ("path", "text", "why"),
    [
        ("/etc/cron.d/deskgpu.cron", GOOD_CRON, "cron never reads"),  # Debian: no dots
        ("/etc/cron.d/deskgpu~", GOOD_CRON, "cron never reads"),
        ("/etc/cron.d/deskgpu", GOOD_CRON.replace("\n", "\r\n"), "Windows line ending"),
        ("/etc/cron.d/deskgpu", GOOD_CRON.rstrip("\n"), "does not end with a newline"),
        ("/etc/cron.d/deskgpu", GOOD_CRON + "*/5 * * * root /bin/true\n", "cron ignores all"),
        ("/etc/cron.d/deskgpu", GOOD_CRON + "this is not cron\n", "cron ignores all"),
        ("/etc/cron.d/deskgpu", "@reboot root deskgpu observe --quiet\n", "only at boot"),
        ("/etc/cron.d/deskgpu", "0 0 31 2 * root deskgpu observe --quiet\n", "never fires"),
        ("/etc/cron.d/deskgpu", "@hourly root deskgpu observe --quiet\n", "runs only every 1h"),
        ("/etc/cron.d/deskgpu", "*/5 * * * * nobody deskgpu observe --quiet\n", "runs as nobody"),
        ("/etc/cron.d/deskgpu", "*/5 * * * * root sudo -u nobody deskgpu observe\n", "as nobody"),
        ("/var/spool/cron/crontabs/alice", "*/5 * * * * deskgpu observe --quiet\n", "as alice"),
        ("/etc/cron.hourly/deskgpu", "#!/bin/sh\ndeskgpu observe --quiet\n", "only every 1h"),
        ("/etc/cron.daily/deskgpu.sh", "#!/bin/sh\ndeskgpu observe --quiet\n", "never reads"),
        (
            "/etc/cron.d/deskgpu",
            "*/5 * * * * root true || /opt/deskgpu/bin/deskgpu observe\n",
            "runs only if",
        ),
    ],
)
def test_cron_entries_that_never_observe_do_not_count(path: str, text: str, why: str) -> None:
    recorded = with_cron(facts("k3s-node-without-gpus.json"), text, path)
    check = judge(recorded)["operations.observe_scheduled"]
    assert check.status in (FAIL, WARN), check
    assert why in check.detail, check.detail


@pytest.mark.parametrize(
    "text",
    [
        "PATH=/opt/deskgpu/bin\n*/5 * * * * root flock -n /run/lock/deskgpu deskgpu observe\n",
        "PATH=/opt/deskgpu/bin\n*/5 * * * * root deskgpu observe >>/var/o-$(date +\\%F) 2>&1\n",
        "*/5 * * * * root env PATH=/opt/deskgpu/bin deskgpu observe\n",
        "*/5 * * * * root /opt/deskgpu/bin/deskgpu observe --json\n",
    ],
)
def test_cron_styles_admins_use_do_count(text: str) -> None:
    recorded = with_cron(facts("k3s-node-without-gpus.json"), text)
    check = judge(recorded)["operations.observe_scheduled"]
    assert check.status == OK, check


def test_roots_crontab_seen_twice_is_one_schedule() -> None:
    recorded = with_cron(facts("k3s-node-without-gpus.json"), "")
    line = "*/5 * * * * /opt/deskgpu/bin/deskgpu observe --quiet\n"
    spool = "/var/spool/cron/crontabs/root"
    recorded.files[f"cron:{spool}"] = FileFact(spool, True, line)
    recorded.commands["crontab"].returncode, recorded.commands["crontab"].stdout = 0, line
    assert judge(recorded)["operations.observe_scheduled"].status == OK


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda u: u.replace("observe --quiet", "observe --quiet >>/var/log/o.log 2>&1"),
         "refuses its arguments"),  # systemd runs no shell
        (lambda u: u.replace("User=root", "User=nobody"), "runs as nobody"),
        (lambda u: u.replace("Type=oneshot", "Type=oneshot\nRemainAfterExit=yes"),
         "RemainAfterExit"),
    ],
)  # fmt: skip
def test_units_that_never_observe_do_not_count(change, why: str) -> None:
    check = _observe_with_unit(change(_rendered_unit()))
    assert check.status == FAIL and why in check.detail, check


def test_a_timer_that_starts_another_service_does_not_count() -> None:
    timer = from_render.rendered_files()[TIMER].replace("[Timer]", "[Timer]\nUnit=other.service")
    check = _observe_with_unit(timer=timer)
    assert check.status == FAIL and "no .timer starts deskgpu-observe.service" in check.detail


def test_a_timer_without_a_trigger_does_not_count() -> None:
    timer = re.sub(r"^On\w+=.*\n", "", from_render.rendered_files()[TIMER], flags=re.M)
    check = _observe_with_unit(timer=timer)
    assert check.status == FAIL and "no On…= trigger" in check.detail


def test_the_copy_systemd_loads_is_the_one_judged() -> None:
    """/etc/systemd/system shadows /usr/lib/systemd/system; a drop-in overrides both."""
    good, bad = _rendered_unit(), _rendered_unit().replace("observe --quiet", "reap --observe")
    lib = "/usr/lib/systemd/system/deskgpu-observe.service"
    check = _observe_with_unit(bad, **{lib: good})
    assert check.status == FAIL and "No such option: --observe" in check.detail
    dropin = "/etc/systemd/system/deskgpu-observe.service.d/override.conf"
    check = _observe_with_unit(
        good,
        **{dropin: "[Service]\nExecStart=\nExecStart=/opt/deskgpu/bin/deskgpu reap --observe\n"},
    )
    assert check.status == FAIL and "No such option: --observe" in check.detail


@pytest.mark.parametrize("extra", ["--record /nonexistent/e.json", "--config /nonexistent.yaml"])
def test_options_that_stop_the_reap_are_not_cosmetic(extra: str) -> None:
    recorded = with_cron(
        facts("k3s-node-without-gpus.json"),
        f"PATH=/opt/deskgpu/bin\n{CRON_LINE}\n0 3 * * 0 root deskgpu reap --yes {extra}\n",
    )
    check = judge(recorded)["operations.reap_scheduled"]
    assert check.status == FAIL and "different job" in check.detail


def test_a_reap_run_dated_in_the_future_is_no_proof() -> None:
    recorded = facts("healthy-4x-a6000.json")
    assert recorded.records is not None
    recorded.records.audit_last_reap = recorded.gathered_at + 400 * 86400
    check = judge(recorded)["operations.reap_ran"]
    assert check.status == WARN and "in the future" in check.detail


@pytest.mark.parametrize(
    "host", ["--ho 0.0.0.0", "--host 127.0.0.1 --host 0.0.0.0", "--host=0.0.0.0", "--hos=::"]
)
def test_every_way_argparse_reads_a_public_host_fails(host: str) -> None:
    recorded = facts("healthy-4x-a6000.json")
    (proc,) = recorded.sky.processes
    proc.cmdline = proc.cmdline.replace("--host 127.0.0.1", host)
    assert judge(recorded)["skypilot.shared_server"].status == FAIL


def test_an_audit_line_too_deep_for_json_is_skipped(tmp_path: Path) -> None:
    from deskgpu.state.audit import last_reap_run

    log = tmp_path / "audit.jsonl"
    log.write_text(
        '{"ts": "2025-06-08T03:02:12Z", "run_id": "r1", "event": "run"}\n' + "[" * 100000
    )
    assert last_reap_run(log) == (1749351732.0, "r1")
