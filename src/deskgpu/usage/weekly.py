"""`deskgpu reap --yes --report`: the week's report after the reap run, one line to each user.

The report never changes the reap's exit status: a history it cannot read is a note, and a
notify hook that fails for one user is that user's failure line (the others still get
theirs).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any

from deskgpu.config import HostConfig
from deskgpu.config.reap import ReapSettings
from deskgpu.errors import OutsideError
from deskgpu.reap import act
from deskgpu.reap.evidence import iso
from deskgpu.usage.report import Report, make, text_lines

WEEK_S = 7 * 86400


@dataclass
class WeeklyReport:
    report: Report | None
    error: str | None = None
    notified: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        if self.report is None:
            return [f"report: {self.error}"]
        out = ["", *text_lines(self.report)]
        if self.notified:
            out.append(f"report sent to: {', '.join(self.notified)}")
        out += [f"report not sent: {f}" for f in self.failures]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": self.error,
            "notified": self.notified,
            "failures": self.failures,
            **({"usage": self.report.to_dict()} if self.report is not None else {}),
        }


def after_reap(
    config: HostConfig, settings: ReapSettings, *, notify: bool, now: float | None = None
) -> WeeklyReport:
    """The last week's report; with `notify`, each user's line through `notify_command`."""
    try:
        report = make(settings, since_s=WEEK_S, now=time.time() if now is None else now)
    except OutsideError as exc:
        return WeeklyReport(None, error=str(exc))
    out = WeeklyReport(report)
    if not notify or not settings.notify_command:
        return out
    host = config.box_name or socket.gethostname()
    for user in report.users:
        if user.user == "?" or user.usage.allocated_s <= 0:
            continue
        line = report.user_line(user)
        error = act.notify(
            settings.notify_command,
            {
                "cluster": "",
                "owner": user.user,
                "reap_after": "",
                "host": host,
                "message": f"Your GPU use on {host}, {line}",
                "kind": "report",
                "since": iso(report.since) or "",
            },
            settings.notify_timeout_s,
        )
        if error:
            out.failures.append(f"{user.user}: {error}")
        else:
            out.notified.append(user.user)
    return out
