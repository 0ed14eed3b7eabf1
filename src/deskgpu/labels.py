"""The labels deskgpu puts on every SkyPilot cluster and pod (via `resources.labels`).

A module of its own, with no imports, so `queue`, `reap` and the policy name them from one
place without pulling in the house rules (and jsonschema behind them).
"""

LABEL_PREFIX = "deskgpu.io"
LABEL_USER = f"{LABEL_PREFIX}/user"
LABEL_JOB = f"{LABEL_PREFIX}/job"
LABEL_KIND = f"{LABEL_PREFIX}/kind"
LABEL_KEEP = f"{LABEL_PREFIX}/keep"
# Set by the admin policy only, on a request from a trusted front end (the host config's
# `trusted_frontends`): which front end launched it, and the front end's own job id.
LABEL_VIA = f"{LABEL_PREFIX}/via"
LABEL_FRONTEND_JOB = f"{LABEL_PREFIX}/frontend-job"
