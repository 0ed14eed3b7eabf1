"""A `kubectl` that replays recorded answers: what doctor's GPU-pod probe asks, case by case.

Tests put a `kubectl` script first on PATH that runs this file (`install(bin_dir, state)`), and
write the case into `<state>/case.json` (`write_case`): the answers to give, as kubectl 1.30
prints them (`-o json`: 4-space indent). Every call is appended to `<state>/calls.jsonl` with
its arguments and stdin, so a test can assert what doctor asked (the manifest it created, the
delete it sent). The pod name in the fixtures is replaced by the one doctor created.

Answers: `create -f -` (the pod's name, from the manifest on stdin), `get runtimeclasses`,
`get pods -l ...` (leftovers), `get pod NAME` (the case's pods in turn, the last one
repeated), `get events`, `logs`, `delete` (kubectl's `pod "NAME" deleted` lines); any other
command is looked up in the case's `recorded` answers (doctor's other kube probes, from a
`--record`ed facts file), by its arguments without `--request-timeout`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures" / "gpu_pod"
STATE_ENV = "FAKE_KUBECTL_STATE"


def install(bin_dir: Path, state: Path) -> None:
    """A `kubectl` in `bin_dir` that answers from `state` (the env var is set in the script)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    program = bin_dir / "kubectl"
    program.write_text(
        "#!/bin/sh\n"
        f"{STATE_ENV}='{state}' exec '{sys.executable}' '{Path(__file__).resolve()}' \"$@\"\n"
    )
    program.chmod(0o755)
    state.mkdir(parents=True, exist_ok=True)


def _library(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return doc


def write_case(
    state: Path, case: str, recorded: dict[str, Any] | None = None, **extra: Any
) -> None:
    """`<state>/case.json` for one case of cases.json; `extra` overrides an answer
    (`leftovers=<listing>`, `create={"returncode": 1, "stderr": ...}`)."""
    cases = _library("cases")
    chosen = cases["cases"][case]
    pods, events, classes = _library("pods"), _library("events"), _library("runtimeclasses")
    answers: dict[str, Any] = {
        "recorded_name": cases["recorded_name"],
        "runtimeclasses": classes[chosen["runtimeclasses"]],
        "leftovers": {"apiVersion": "v1", "items": [], "kind": "List", "metadata": {}},
        "pods": [pods[p] for p in chosen["pods"]],
        "events": events[chosen["events"]],
        "logs": {"stdout": cases["logs"].get(chosen.get("logs"), ""), "returncode": 0},
        "recorded": recorded or {},
    }
    answers.update(extra)
    (state / "case.json").write_text(json.dumps(answers))


def calls(state: Path) -> list[dict[str, Any]]:
    """What kubectl was asked, in order: `{"args": [...], "stdin": text or None}`."""
    log = state / "calls.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line]


def recorded_answers(facts: dict[str, Any]) -> dict[str, Any]:
    """The kube probes' answers in a `--record`ed facts document, by their arguments."""
    out = {}
    for result in facts["commands"].values():
        argv = result["argv"]
        if argv and argv[0] == "kubectl":
            out[_key(argv[1:])] = result
    return out


def _key(args: list[str]) -> str:
    return " ".join(a for a in args if not a.startswith("--request-timeout"))


def _print_json(doc: Any, name: str, recorded_name: str) -> None:
    sys.stdout.write(json.dumps(doc, indent=4).replace(recorded_name, name) + "\n")


def main(argv: list[str]) -> int:
    import os

    state = Path(os.environ[STATE_ENV])
    args = [a for a in argv if not a.startswith("--request-timeout")]
    stdin = sys.stdin.read() if args[:3] == ["create", "-f", "-"] else None
    with (state / "calls.jsonl").open("a") as log:
        log.write(json.dumps({"args": args, "stdin": stdin, "at": time.time()}) + "\n")
    case = json.loads((state / "case.json").read_text())
    recorded_name = case["recorded_name"]
    name_file = state / "pod-name"
    name = name_file.read_text() if name_file.exists() else recorded_name
    verb, what = [*args, "", ""][:2]
    if verb == "create":
        answer = case.get("create")
        if answer:
            sys.stderr.write(answer.get("stderr", ""))
            return int(answer.get("returncode", 1))
        name = json.loads(stdin or "{}")["metadata"]["name"]
        name_file.write_text(name)
        print(f"pod/{name}")
        return 0
    if verb == "get" and what == "runtimeclasses":
        _print_json(case["runtimeclasses"], name, recorded_name)
        return 0
    if verb == "get" and what == "pods" and "-l" in args:
        _print_json(case["leftovers"], name, recorded_name)
        return 0
    if verb == "get" and what == "pod":
        polls = state / "polls"
        n = int(polls.read_text()) if polls.exists() else 0
        polls.write_text(str(n + 1))
        _print_json(case["pods"][min(n, len(case["pods"]) - 1)], name, recorded_name)
        return 0
    if verb == "get" and what == "events":
        _print_json(case["events"], name, recorded_name)
        return 0
    if verb == "logs":
        sys.stdout.write(case["logs"]["stdout"])
        return int(case["logs"]["returncode"])
    if verb == "delete":
        rest = args[2:]
        names = [
            a
            for i, a in enumerate(rest)
            if not a.startswith("-") and (i == 0 or rest[i - 1] != "-n")
        ]
        for deleted in names:
            print(f'pod "{deleted}" deleted')
        return 0
    found = case["recorded"].get(_key(args))
    if found is None:
        sys.stderr.write(f"fake kubectl: no recorded answer for `kubectl {' '.join(args)}`\n")
        return 1
    sys.stdout.write(found.get("stdout") or "")
    sys.stderr.write(found.get("stderr") or "")
    return int(found["returncode"]) if found.get("returncode") is not None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
