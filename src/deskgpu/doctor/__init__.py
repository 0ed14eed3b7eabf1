"""`deskgpu doctor`: gather host facts, judge them, report (see `report.run_doctor`)."""

from deskgpu.doctor.report import DoctorResult, run_doctor

__all__ = ["DoctorResult", "run_doctor"]
