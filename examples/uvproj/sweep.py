"""A toy hyper-parameter sweep run by examples/uv-job.yaml."""

import os

import numpy as np

out = os.environ.get("DESKGPU_CHECKPOINT_DIR", ".")
for lr in (1e-4, 3e-4, 1e-3):
    print(f"lr={lr}: score={float(np.exp(-abs(np.log10(lr) + 3.5))):.3f}")
print(f"results would go to {out}")
