"""What the cluster enforces by itself: the jobs' Kubernetes identity and an admission policy.

The admin policy sees requests to SkyPilot, not the Kubernetes API. SkyPilot 0.14 runs every
pod as `skypilot-service-account`, bound to a Role allowing every verb in the namespace
(sky/templates/kubernetes-ray.yml.j2 `autoscaler_role`), so a job's own code could create a
privileged or hostPath pod directly. Two things close that, both rendered by `deskgpu setup
render` and applied by its install.sh:

- **The jobs' identity** (`job_identity_objects`): a ServiceAccount whose Role grants only what
  SkyPilot's code inside a pod does against the API. The house rules set it as every on-box
  task's `kubernetes.remote_identity` (SkyPilot then creates no RBAC of its own for it:
  sky/provision/kubernetes/config.py bootstrap_instances).
- **An admission policy** (`admission_objects`): a ValidatingAdmissionPolicy (CEL) in the jobs'
  namespace that admits only the box's two host volumes, mounted the way deskgpu mounts them,
  and no privileged settings, whoever creates the pod; and lets the jobs' identity delete only
  its own cluster's pods and services.

Pure data, no I/O: render writes it, doctor names what it probes, the house rules name the SA.
"""

from __future__ import annotations

import json
from typing import Any

from deskgpu.config import HostConfig
from deskgpu.house_rules import CHECKPOINT_VOLUME, DATA_VOLUME, host_mounts_pod_config
from deskgpu.kubenames import (
    ADMISSION_POLICY,
    DELETE_POLICY,
    JOB_SERVICE_ACCOUNT,
    JOBS_NAMESPACE,
    NVIDIA_RUNTIME_CLASS,
)
from deskgpu.labels import LABEL_USER

JOB_ROLE = JOB_SERVICE_ACCOUNT
JOB_USERNAME = f"system:serviceaccount:{JOBS_NAMESPACE}:{JOB_SERVICE_ACCOUNT}"
RBAC_API = "rbac.authorization.k8s.io/v1"
ADMISSION_API = "admissionregistration.k8s.io/v1"
NODE_API = "node.k8s.io/v1"
# ValidatingAdmissionPolicy is GA (admissionregistration.k8s.io/v1) since Kubernetes 1.30; the
# tests validate the manifests against this version's OpenAPI schemas.
KUBERNETES_VERSION = "1.30"
# The pod a service-account token was issued to (bound tokens, Kubernetes 1.30+).
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
CLUSTER_LABEL = "skypilot-cluster"  # on every pod and service of a SkyPilot cluster

# What SkyPilot 0.14's code in a job's pod does against the Kubernetes API, with in-cluster
# credentials (the pod gets SKYPILOT_IN_CLUSTER_CONTEXT_NAME = its context, so
# get_context_from_config returns None: sky/clouds/kubernetes.py, provision/kubernetes/utils.py).
# Only autodown calls it: skylet's StopEvent -> _stop_cluster_with_new_provisioner
# (sky/skylet/events.py) -> provision/kubernetes/instance.py terminate_instances. Nothing else in
# a job pod does (the API server provisions, queries and tears down with its own kubeconfig;
# `sky` inside a job talks HTTP to the API server; managed jobs' controller runs in the server).
JOB_RULES: list[dict[str, Any]] = [
    {
        # list: terminate_instances finds the cluster's pods by label (utils.py filter_pods).
        # delete: it deletes each, force (grace 0) unless it holds DRA claims (instance.py
        # _delete_pod); the deletes policy limits it to the cluster's own pods. No get: only
        # the graceful path for DRA pods polls the pod, and the house rules allow no claims.
        "apiGroups": [""],
        "resources": ["pods"],
        "verbs": ["list", "delete"],
    },
    {
        # delete: `<pod>` and `<pod>-ssh` before the pod itself (instance.py _delete_services;
        # a 403 there fails the autodown). No deletecollection: the label-selector fallback
        # (_delete_cluster_services) only logs a warning when refused, and the server's own
        # teardown cleans up services of pods deleted elsewhere.
        "apiGroups": [""],
        "resources": ["services"],
        "verbs": ["delete"],
    },
    {
        # create: the autodown breadcrumb the server reads to say "autodowned"
        # (instance.py emit_autostop_event_best_effort; best effort, core/v1 Event).
        "apiGroups": [""],
        "resources": ["events"],
        "verbs": ["create"],
    },
    # Not granted, and refused harmlessly: `list deployments` (is_high_availability_cluster_
    # by_kubectl treats an error as "not an HA controller", which a job never is).
]


def job_identity_objects() -> list[dict[str, Any]]:
    """ServiceAccount, Role (JOB_RULES) and RoleBinding the jobs run as."""
    meta = {"name": JOB_SERVICE_ACCOUNT, "namespace": JOBS_NAMESPACE}
    labels = {"app.kubernetes.io/managed-by": "deskgpu"}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {**meta, "labels": labels}},
        {
            "apiVersion": RBAC_API,
            "kind": "Role",
            "metadata": {**meta, "labels": labels},
            "rules": JOB_RULES,
        },
        {
            "apiVersion": RBAC_API,
            "kind": "RoleBinding",
            "metadata": {**meta, "labels": labels},
            "subjects": [
                {"kind": "ServiceAccount", "name": JOB_SERVICE_ACCOUNT, "namespace": JOBS_NAMESPACE}
            ],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": JOB_ROLE},
        },
    ]


def nvidia_runtime_class() -> dict[str, Any]:
    """The RuntimeClass that runs a pod with the NVIDIA container runtime: its handler is the
    runtime k3s adds to its containerd config when it finds nvidia-container-runtime."""
    return {
        "apiVersion": NODE_API,
        "kind": "RuntimeClass",
        "metadata": {
            "name": NVIDIA_RUNTIME_CLASS,
            "labels": {"app.kubernetes.io/managed-by": "deskgpu"},
        },
        "handler": NVIDIA_RUNTIME_CLASS,
    }


def host_paths(config: HostConfig) -> tuple[str, str]:
    """The data and checkpoint hostPaths exactly as the house rules write them."""
    volumes = host_mounts_pod_config(config, "x")["spec"]["volumes"]
    by_name = {v["name"]: v["hostPath"]["path"] for v in volumes}
    return by_name[DATA_VOLUME], by_name[CHECKPOINT_VOLUME]


_CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")


def _cel(text: str) -> str:
    return json.dumps(text)  # a CEL string literal (JSON's escapes are CEL's)


def _every_container(cond: str) -> str:
    """`cond` (over `c`) holds for every container, init container and ephemeral container."""
    return " && ".join(
        f"(!has(object.spec.{f}) || object.spec.{f}.all(c, {cond}))" for f in _CONTAINER_LISTS
    )


def _not_set(field: str) -> str:
    return (
        f"!(has(c.securityContext) && has(c.securityContext.{field}) && c.securityContext.{field})"
    )


def _mounts_of_host_path(path: str, cond: str) -> str:
    """Every mount (`m`) of a hostPath volume of `path`, in any container, satisfies `cond`."""
    each = _every_container(
        f"!has(c.volumeMounts) || c.volumeMounts.all(m, m.name != v.name || {cond})"
    )
    return (
        "!has(object.spec.volumes) || object.spec.volumes.all(v, !has(v.hostPath) || "
        f"v.hostPath.path != {_cel(path)} || ({each}))"
    )


def pod_validations(config: HostConfig) -> list[dict[str, str]]:
    """The CEL rules every pod created in the jobs' namespace must pass."""
    data, checkpoints = host_paths(config)
    user = _cel(LABEL_USER)
    host_ns = " && ".join(
        f"!(has(object.spec.{k}) && object.spec.{k})" for k in ("hostNetwork", "hostPID", "hostIPC")
    )
    caps = (
        "!(has(c.securityContext) && has(c.securityContext.capabilities) && "
        "has(c.securityContext.capabilities.add) && size(c.securityContext.capabilities.add) > 0)"
    )
    own_subpath = (
        "(has(m.subPath) && m.subPath != '' && has(object.metadata.labels) && "
        f"{user} in object.metadata.labels && m.subPath == object.metadata.labels[{user}])"
    )
    rules = [
        (host_ns, "deskgpu: no hostNetwork, hostPID or hostIPC in a job's pod"),
        (
            _every_container(_not_set("privileged")),
            "deskgpu: no privileged container in a job's pod",
        ),
        (
            _every_container(_not_set("allowPrivilegeEscalation")),
            "deskgpu: no allowPrivilegeEscalation: true in a job's pod",
        ),
        (_every_container(caps), "deskgpu: no added capabilities in a job's pod"),
        (
            "!has(object.spec.volumes) || object.spec.volumes.all(v, !has(v.hostPath) || "
            f"v.hostPath.path in [{_cel(data)}, {_cel(checkpoints)}])",
            f"deskgpu: the only hostPath volumes are {data} and {checkpoints}",
        ),
        (
            _mounts_of_host_path(data, "(has(m.readOnly) && m.readOnly)"),
            f"deskgpu: {data} is mounted read-only",
        ),
        (
            _mounts_of_host_path(checkpoints, own_subpath),
            f"deskgpu: {checkpoints} is mounted only with subPath = the pod's {LABEL_USER} label",
        ),
    ]
    return [{"expression": e, "message": m, "reason": "Forbidden"} for e, m in rules]


def delete_validations() -> list[dict[str, str]]:
    """The jobs' identity deletes only pods and services of the cluster it runs in.

    Autodown runs on the head pod (`<cluster>-head`, whose bound token names it) and deletes
    the objects labelled `skypilot-cluster: <cluster>`.
    """
    extra = _cel(POD_NAME_EXTRA)
    label = _cel(CLUSTER_LABEL)
    return [
        {
            "expression": (
                f"has(request.userInfo.extra) && {extra} in request.userInfo.extra && "
                f"has(oldObject.metadata.labels) && {label} in oldObject.metadata.labels && "
                f"request.userInfo.extra[{extra}].exists(p, "
                f"p == oldObject.metadata.labels[{label}] + '-head')"
            ),
            "message": "deskgpu: a job may delete only its own cluster's pods and services",
            "reason": "Forbidden",
        }
    ]


def _namespace_binding(name: str) -> dict[str, Any]:
    return {
        "apiVersion": ADMISSION_API,
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": JOBS_NAMESPACE}
                }
            },
        },
    }


def admission_objects(config: HostConfig) -> list[dict[str, Any]]:
    """Both ValidatingAdmissionPolicies and their bindings, scoped to the jobs' namespace."""
    pods = {
        "apiVersion": ADMISSION_API,
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": ADMISSION_POLICY},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                    },
                    {
                        # `kubectl debug`: an ephemeral container is added by UPDATE.
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["UPDATE"],
                        "resources": ["pods/ephemeralcontainers"],
                    },
                ]
            },
            "validations": pod_validations(config),
        },
    }
    deletes = {
        "apiVersion": ADMISSION_API,
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": DELETE_POLICY},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["DELETE"],
                        "resources": ["pods", "services"],
                    }
                ]
            },
            "matchConditions": [
                {
                    "name": "job-identity",
                    "expression": f"request.userInfo.username == {_cel(JOB_USERNAME)}",
                }
            ],
            "validations": delete_validations(),
        },
    }
    return [pods, _namespace_binding(ADMISSION_POLICY), deletes, _namespace_binding(DELETE_POLICY)]
