"""Names of deskgpu's own objects on the cluster (a leaf: the house rules and render share it)."""

# SkyPilot's pods land in the kube context's namespace; k3s's context names none: `default`.
JOBS_NAMESPACE = "default"
# The ServiceAccount every job's pod runs as (`kubernetes.remote_identity`), rendered by
# `deskgpu setup render` (deskgpu.setup.cluster.job_identity_objects).
JOB_SERVICE_ACCOUNT = "deskgpu-job"
# The ValidatingAdmissionPolicies (deskgpu.setup.cluster.admission_objects), each bound by a
# ValidatingAdmissionPolicyBinding of the same name: what pods may be, and what the jobs'
# identity may delete.
ADMISSION_POLICY = "deskgpu-job-pods"
DELETE_POLICY = "deskgpu-job-deletes"
POLICIES = (ADMISSION_POLICY, DELETE_POLICY)
# The RuntimeClass of the NVIDIA container runtime. SkyPilot 0.14 sets `runtimeClassName:
# nvidia` on every GPU pod when a RuntimeClass of this name exists
# (sky/provision/kubernetes/instance.py _configure_runtime_class); k3s v1.29+ creates it when
# it finds nvidia-container-runtime, and install.sh applies deskgpu's copy when it is absent.
NVIDIA_RUNTIME_CLASS = "nvidia"
# The node label SkyPilot reads a GPU's type from when GPU Feature Discovery's
# `nvidia.com/gpu.product` is absent; its value is the accelerator name in lower case
# (sky/provision/kubernetes/utils.py SkyPilotLabelFormatter).
ACCELERATOR_LABEL = "skypilot.co/accelerator"


def accelerator_label_value(model: str) -> str:
    """`A6000` -> `a6000`: the value SkyPilot matches `accelerators: A6000:N` against."""
    return model.lower()


# The well-known label every node carries with its name: a job pinned to a node (`node:` in a
# job spec) gets `nodeSelector: {kubernetes.io/hostname: <node>}` in its pod_config.
HOSTNAME_LABEL = "kubernetes.io/hostname"
# The annotation the server's install.sh puts on its own node: the deskgpu version its files
# were rendered by, so an agent's doctor can tell a version skew from its side.
VERSION_ANNOTATION = "deskgpu.io/version"
