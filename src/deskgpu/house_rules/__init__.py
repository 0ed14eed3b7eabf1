"""The house rules as functions over a SkyPilot task dict: one implementation for everyone.

`deskgpu submit` builds a base task from a job spec and applies these rules (`expand.py`);
the admin policy (`policy.py`) applies the same rules to every request reaching the shared
API server, whether it came from `sky launch`, Transformer Lab or deskgpu itself.

Pure: no I/O, no SkyPilot import. `apply_house_rules` returns deskgpu's form of a task, and
applying it to its own output changes nothing. The parts: `common` (the vocabulary),
`taskdict` (reading task dicts), `apply`, `check`, and `podspec` (what a pod may hold, as a
declarative allow-list).
"""

from deskgpu.house_rules.apply import (
    apply_house_rules,
    host_mounts_pod_config,
    replaced_mount_notes,
)
from deskgpu.house_rules.check import (
    HOSTPATH_VOLUME,
    check_house_rules,
    cluster_name_violation,
    sky_cleaned_username,
    volume_registration_violation,
)
from deskgpu.house_rules.common import (
    BATCH,
    CHECKPOINT_MOUNT,
    CHECKPOINT_VOLUME,
    DATA_MOUNT,
    DATA_VOLUME,
    DESKGPU_ENV,
    GPU_VISIBILITY_ENV,
    INTERACTIVE,
    KINDS,
    MAIN_CONTAINER,
    RESERVED_ENV_PREFIX,
    SAFE_REMOTE_IDENTITIES,
    UNNAMED,
    Violation,
    checkpoint_dir,
    is_secret_name,
    job_of,
    label_value,
    session_idle_minutes,
    user_checkpoint_root,
    user_prefixed,
)
from deskgpu.house_rules.podspec import sky_config_violations
from deskgpu.house_rules.taskdict import idle_minutes_of, lifted_config, on_box, own_standard_mounts
from deskgpu.labels import LABEL_JOB, LABEL_KIND, LABEL_USER

__all__ = [
    "BATCH",
    "CHECKPOINT_MOUNT",
    "CHECKPOINT_VOLUME",
    "DATA_MOUNT",
    "DATA_VOLUME",
    "DESKGPU_ENV",
    "GPU_VISIBILITY_ENV",
    "HOSTPATH_VOLUME",
    "INTERACTIVE",
    "KINDS",
    "LABEL_JOB",
    "LABEL_KIND",
    "LABEL_USER",
    "MAIN_CONTAINER",
    "RESERVED_ENV_PREFIX",
    "SAFE_REMOTE_IDENTITIES",
    "UNNAMED",
    "Violation",
    "apply_house_rules",
    "check_house_rules",
    "checkpoint_dir",
    "cluster_name_violation",
    "host_mounts_pod_config",
    "idle_minutes_of",
    "is_secret_name",
    "job_of",
    "label_value",
    "lifted_config",
    "on_box",
    "own_standard_mounts",
    "replaced_mount_notes",
    "session_idle_minutes",
    "sky_cleaned_username",
    "sky_config_violations",
    "user_checkpoint_root",
    "user_prefixed",
    "volume_registration_violation",
]  # fmt: skip
