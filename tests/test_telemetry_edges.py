"""The edges of the Prometheus telemetry source that need no Prometheus running.

- deskgpu's own textfile (what each node's `observe --textfile` writes) carries the series
  `telemetry.gpus` and `telemetry.history` read, under the same names and labels as the
  harness serves them (tests/promcluster.py), so the cluster tests read what a node writes;
- a Prometheus that is not there is one line and exit 1 (reap) or a GPU half that says why
  (queue), within seconds, never a traceback;
- a process or session seen on another node is never signalled or torn down from here.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest

from deskgpu.reap.rule import Action, Decision
from deskgpu.snapshot import (
    HOLDER_UNMANAGED,
    Gpu,
    GpuProcess,
    Holder,
    NvmlView,
    Snapshot,
)
from deskgpu.usage import textfile
from tests import promcluster as pc

_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _series(
    text: str, prefix: tuple[str, ...]
) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    out = set()
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or not m.group(1).startswith(prefix):
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        out.add((m.group(1), labels, float(m.group(3))))
    return out


def test_deskgpu_textfile_carries_what_the_cluster_reads_as_the_harness_serves_it() -> None:
    now = 1_796_000_000.0
    gpu = Gpu(index=5, uuid="GPU-b5", name="NVIDIA H100 80GB HBM3")
    holder = Holder(
        kind=HOLDER_UNMANAGED, unix_user="bob", command="/usr/bin/python train.py --token=s3cret"
    )
    gpu.processes.append(GpuProcess(pid=4242, used_memory_mib=8000.0, holder=holder))
    snap = Snapshot(taken_at=now, nvml=NvmlView(available=True, gpus=[gpu]))
    activity = [("dave-nb-7f3c", 0, 123.5), ("carol-dbg-2ea4", 1, None)]
    written = textfile.render(snap, [], [], {}, activity)
    node = pc.NodeState(
        "lab-b",
        [],
        unmanaged=[pc.UnmanagedProc(5, "GPU-b5", 4242, "bob", "python", 8000.0)],
        activity=[
            pc.SessionActivity("dave-nb-7f3c", 0, 123.5),
            pc.SessionActivity("carol-dbg-2ea4", 1, None),
        ],
        observed_at=now,
    )
    served = pc.textfile_exposition(node, now)
    families = (
        "deskgpu_unmanaged_process_memory_used_bytes",
        "deskgpu_session_",
        "deskgpu_observe_timestamp_seconds",
    )
    mine = _series(written, families)
    assert mine == _series(served, families)
    assert len(mine) == 1 + 1 + 2 + 1  # observed, bob, two SSH counts, one CPU total
    assert "s3cret" not in written and "train.py" not in written  # the program's name only


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        f"telemetry: {{prometheus: 'http://127.0.0.1:{_closed_port()}'}}\n"
    )
    return path


def test_no_prometheus_is_one_line_and_exit_1_for_reap(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DESKGPU_TELEMETRY", raising=False)
    result = cli("reap", "--config", str(_config(tmp_path)))
    assert result.exit_code == 1
    assert "Prometheus at http://127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_no_prometheus_leaves_queue_a_gpu_half_that_says_why(
    cli, tmp_path: Path, monkeypatch
) -> None:
    from deskgpu.skypilot import sdk
    from deskgpu.snapshot import SkyView

    monkeypatch.delenv("DESKGPU_TELEMETRY", raising=False)
    monkeypatch.setattr(sdk, "fetch_queue", lambda _c, **_kw: SkyView(available=True))
    result = cli("queue", "--json", "--config", str(_config(tmp_path)))
    doc = json.loads(result.stdout)
    assert doc["nvml"]["available"] is False and doc["nvml"]["source"] == "prometheus"
    assert "Prometheus at http://127.0.0.1:" in doc["nvml"]["error"]
    assert "Traceback" not in result.stderr


def test_nvml_env_reads_this_host_whatever_the_config_says(monkeypatch, tmp_path: Path) -> None:
    from deskgpu import queue as survey
    from deskgpu.config import load_config
    from deskgpu.snapshot import SkyView

    config = load_config(_config(tmp_path))
    monkeypatch.setenv("DESKGPU_TELEMETRY", "nvml")
    called = []
    sources = survey.Sources(
        read_nvml=lambda: NvmlView(available=True),
        read_prometheus=lambda _c: called.append("prometheus") or NvmlView(available=False),
        fetch_sky=lambda _c: SkyView(available=True),
        read_notices=lambda _c: [],
    )
    snap = survey.take(config, sources)
    assert snap.nvml.available and called == []


def test_a_process_on_another_node_is_never_signalled(tmp_path: Path) -> None:
    from deskgpu.identity import Actor
    from deskgpu.reap import act

    decision = Decision(
        subject="pid:1234@lab-b",
        action=Action.REPORT_UNMANAGED,
        owner="bob",
        kind="unmanaged",
        reasons=("held",),
        pid=1234,
        command="python train.py",
        node="lab-b",
    )
    sent: list[tuple[int, int]] = []
    root = Actor(user="root", uid=0, groups=frozenset())
    outcome = act.kill_unmanaged(
        decision, root, 1.0, tmp_path, send=lambda p, s: sent.append((p, s))
    )
    assert not outcome.ok and outcome.did == "skipped" and "lab-b" in outcome.message
    assert sent == []


def test_a_session_on_another_node_is_not_torn_down_from_here() -> None:
    from deskgpu.config import HostConfig
    from deskgpu.reap import run

    decision = Decision(
        subject="dave-nb", action=Action.REAP, owner="dave", kind="interactive",
        reasons=("idle",), gpus=(0,), node="lab-c",
    )  # fmt: skip
    polled: list[str] = []
    live = run.Live(gpu_util=lambda: polled.append("util") or {0: 0.0})
    why = run.owner_back(decision, HostConfig(), HostConfig().reap_settings, live, {"uid-1"})
    assert why is not None and "lab-c" in why and polled == []


def test_a_prometheus_url_with_a_login_is_refused_without_echoing_it(cli, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("telemetry:\n  prometheus: http://admin:s3cret@127.0.0.1:9090\n")
    result = cli("queue", "--config", str(path))
    assert result.exit_code == 2
    assert f"{path}:2:15: telemetry.prometheus: carries a login" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout


def test_promql_literals_match_exactly_what_they_name() -> None:
    """Names reach PromQL quoted (`_quote`) and as exact-match regexes (`_regex`): Go's string
    escapes, then RE2's. Held here against Python's `re` for the regex half."""
    import re as stdlib_re

    from deskgpu.telemetry.history import _quote, _regex

    def unquote(text: str) -> str:  # what PromQL's lexer makes of a double-quoted string
        return json.loads(f'"{text}"')

    for name in ['a"b', "a\\b", "a\\\\b", "a\nb", "x.y", "a|b", "(a)", "[a]", "a{2}", "é-ü", "^$"]:
        assert unquote(_quote(name)) == name
        pattern = unquote(_regex(name))
        assert stdlib_re.fullmatch(pattern, name), name
        assert not stdlib_re.fullmatch(pattern, name + "x")


class _OddPrometheus:
    """An HTTP server on 127.0.0.1 answering every API call with `body` after `delay` s."""

    def __init__(self, body: object, delay: float = 0.0, status: int = 200) -> None:
        import http.server
        import threading

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                time.sleep(outer.delay)
                data = json.dumps(outer.body).encode()
                try:
                    self.send_response(outer.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.body, self.delay, self.status = body, delay, status
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _OddPrometheus:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _vector(item: object) -> object:
    return {"status": "success", "data": {"resultType": "vector", "result": [item]}}


def _odd_config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\ntelemetry: {{prometheus: '{url}'}}\n")
    return path


@pytest.mark.parametrize(
    "body",
    [
        _vector({"metric": {}, "value": [1, "2", 3]}),
        _vector({"metric": [], "value": [1, "2"]}),
        _vector({"metric": {}, "value": ["x", "2"]}),
        _vector({"metric": {"node": "n", "gpu": "0", "__name__": "DCGM_FI_DEV_GPU_UTIL"},
                 "value": [1, "+Inf"]}),
        {"status": "error", "errorType": "bad_data", "error": "parse error"},
    ],
)  # fmt: skip
def test_an_answer_no_parser_expects_is_one_line_never_a_traceback(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: object
) -> None:
    from deskgpu.skypilot import sdk
    from deskgpu.snapshot import SkyView

    monkeypatch.delenv("DESKGPU_TELEMETRY", raising=False)
    monkeypatch.setattr(sdk, "fetch_queue", lambda _c, **_kw: SkyView(available=True))
    with _OddPrometheus(body) as prom:
        config = _odd_config(tmp_path, prom.url)
        queue = cli("queue", "--json", "--config", str(config))
        reap = cli("reap", "--config", str(config))
    assert queue.exit_code == 0 and json.loads(queue.stdout)["sky"]["available"]
    assert reap.exit_code in (0, 1) and "internal error" not in reap.stderr  # 0: read as unknown
    for result in (queue, reap):
        assert "Traceback" not in result.stdout + result.stderr


def test_a_silent_prometheus_ends_at_queues_timeout(cli, tmp_path: Path, monkeypatch) -> None:
    from deskgpu.skypilot import sdk
    from deskgpu.snapshot import SkyView

    monkeypatch.delenv("DESKGPU_TELEMETRY", raising=False)
    monkeypatch.setattr(sdk, "fetch_queue", lambda _c, **_kw: SkyView(available=True))
    with _OddPrometheus({"status": "success", "data": {}}, delay=30) as prom:
        started = time.monotonic()
        result = cli(
            "queue", "--json", "--timeout", "3", "--config", str(_odd_config(tmp_path, prom.url))
        )
        took = time.monotonic() - started
    doc = json.loads(result.stdout)
    assert doc["nvml"]["available"] is False and "Prometheus" in doc["nvml"]["error"]
    assert took < 10  # the budget, plus the slack of a loaded machine; never 30 s per request
