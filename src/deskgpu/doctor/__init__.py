"""`deskgpu doctor`: gather host facts, judge them, report (see `report.run_doctor`).

Nothing is imported here: the config loader reads `registry` and `settings` without the rest.
"""
