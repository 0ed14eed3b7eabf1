"""`run_doctor`: facts (live or recorded) -> checks -> a result that carries its exit code."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deskgpu.config import HostConfig
from deskgpu.config.doctor import RETIRED
from deskgpu.doctor.checks import FAIL, STATUSES, Check, run_checks
from deskgpu.doctor.facts import FactsFormatError, HostFacts
from deskgpu.errors import ExitStatus, UsageError
from deskgpu.recorded import read_document, write_document

REPORT_VERSION = 1
REPORT_KIND = "deskgpu.doctor/report"


@dataclass
class DoctorResult:
    """What one doctor run found. `exit_status`: 0 nothing failed, 3 a check failed."""

    checks: list[Check]
    facts: HostFacts
    config_source: str
    source: str = "live"  # "live" or "recorded <file>"
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for check in self.checks:
            counts[check.status] += 1
        return counts

    @property
    def exit_status(self) -> ExitStatus:
        return ExitStatus.FOUND if any(c.status == FAIL for c in self.checks) else ExitStatus.OK

    def summary_line(self) -> str:
        s = self.summary
        verdict = "FAIL" if self.exit_status else "OK"
        return (
            f"{verdict}: {s['ok']} ok, {s['warn']} warn, {s['fail']} fail, {s['skip']} skip "
            f"on {self.facts.hostname or 'this host'} ({self.elapsed_s:.1f} s, {self.source})"
        )

    def as_json(self) -> dict[str, Any]:
        """The documented `deskgpu doctor --json` document (REPORT_VERSION 1)."""
        return {
            "kind": REPORT_KIND,
            "version": REPORT_VERSION,
            "host": self.facts.hostname,
            "user": self.facts.user,
            "gathered_at": self.facts.gathered_at,
            "source": self.source,
            "config": self.config_source,
            "elapsed_s": round(self.elapsed_s, 3),
            "exit_status": int(self.exit_status),
            "summary": self.summary,
            "checks": [c.as_json() for c in self.checks],
            "notes": self.notes,
        }


def load_facts(path: Path) -> HostFacts:
    """Recorded facts (`--facts FILE`); a bad file is a usage error with one clear line."""
    try:
        return HostFacts.from_dict(read_document(path, "recorded facts"))
    except FactsFormatError as exc:
        raise UsageError(f"{path}: {exc}") from None


def save_facts(facts: HostFacts, path: Path) -> None:
    write_document(path, facts.to_dict(), "the facts")


def run_doctor(
    config: HostConfig,
    facts: HostFacts | None = None,
    *,
    source: str = "live",
    timeout_s: float | None = None,
    gpu_pod_wait_s: float | None = None,
) -> DoctorResult:
    """Check the host: probe it live (or judge recorded `facts`) and return the verdicts.

    `gpu_pod_wait_s`: also start one 1-GPU pod and wait up to that long for it (`--gpu-pod`).
    """
    start = time.monotonic()
    if facts is None:
        from deskgpu.doctor import probes

        timeout = timeout_s or config.doctor.probe_timeout_s
        facts = probes.gather(config, timeout_s=timeout, gpu_pod_wait_s=gpu_pod_wait_s)
    checks = run_checks(facts, config)
    return DoctorResult(
        checks=checks,
        facts=facts,
        config_source=config.source,
        source=source,
        elapsed_s=time.monotonic() - start,
        notes=list(facts.notes) + [RETIRED[k] for k in config.doctor.retired],
    )
