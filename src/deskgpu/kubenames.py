"""Names of deskgpu's own objects on the cluster (a leaf: the house rules and render share it)."""

# SkyPilot's pods land in the kube context's namespace; k3s's context names none: `default`.
JOBS_NAMESPACE = "default"
# The ServiceAccount every job's pod runs as (`kubernetes.remote_identity`), rendered by
# `deskgpu setup render` (deskgpu.cluster.job_identity_objects).
JOB_SERVICE_ACCOUNT = "deskgpu-job"
# The ValidatingAdmissionPolicies (deskgpu.cluster.admission_objects), each bound by a
# ValidatingAdmissionPolicyBinding of the same name: what pods may be, and what the jobs'
# identity may delete.
ADMISSION_POLICY = "deskgpu-job-pods"
DELETE_POLICY = "deskgpu-job-deletes"
POLICIES = (ADMISSION_POLICY, DELETE_POLICY)
