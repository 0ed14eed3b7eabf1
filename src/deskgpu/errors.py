"""Exit codes and the typed errors the CLI turns into one clean line each."""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """Exit codes scripts rely on (see DESIGN.md, "CLI contracts")."""

    OK = 0
    OUTSIDE_FAILURE = 1  # SkyPilot API server, NVML, docker, kube
    USAGE = 2  # bad flags, invalid job spec or host config
    FOUND = 3  # doctor has a failing check; a dry-run reap found zombies


class DeskgpuError(Exception):
    """Base of every error the CLI reports without a traceback."""

    exit_status = ExitStatus.OUTSIDE_FAILURE

    def lines(self) -> list[str]:
        return [str(self)]


class UsageError(DeskgpuError):
    exit_status = ExitStatus.USAGE


class SpecError(UsageError):
    """One or more problems in a YAML file the user wrote, each located."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems

    def lines(self) -> list[str]:
        return list(self.problems)


class OutsideError(DeskgpuError):
    """An outside system (SkyPilot, NVML, docker, kube) failed or is unreachable."""

    exit_status = ExitStatus.OUTSIDE_FAILURE
