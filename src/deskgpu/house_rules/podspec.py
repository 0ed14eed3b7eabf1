"""What a request may put in a pod: a declarative allow-list, walked by one function.

`POD_CONFIG` says, key by key, what a `pod_config` may hold; anything it does not name is
refused. `walk(shape, value, where, ctx)` yields a `Violation(rule, problem, fix)` for each
departure, the problem starting with the path (`config.kubernetes.pod_config.spec.hostPID`).
docs/house-rules.md's allow-list section is `readme_section()` (a test keeps them equal).

`sky_config_violations` applies it to the `kubernetes` / `ssh` sections of a SkyPilot config
mapping: a task's own `config`, and the request's whole SkyPilot config (the client's
`~/.sky/config.yaml` / `--config` is merged into the server's and its `pod_config` into
every pod): `pod_config` (also per context), `remote_identity`, `custom_metadata`,
`enable_docker`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from deskgpu.config import HostConfig
from deskgpu.house_rules.common import (
    _OUR_VOLUMES,
    CHECKPOINT_MOUNT,
    CHECKPOINT_VOLUME,
    DATA_VOLUME,
    GPU_VISIBILITY_ENV,
    MAIN_CONTAINER,
    SAFE_REMOTE_IDENTITIES,
    Violation,
    _gpu_env_violation,
    _host_path_violation,
    _our_mounts,
    _reserved,
    _reserved_violation,
)
from deskgpu.house_rules.nodes import unknown_node_violation
from deskgpu.identity import safe_user
from deskgpu.kubenames import ACCELERATOR_LABEL, HOSTNAME_LABEL, JOB_SERVICE_ACCOUNT


@dataclass(frozen=True)
class Context:
    """What the walk needs besides the value: the box, the requester, the volumes it may mount."""

    config: HostConfig
    user: str
    emptydirs: frozenset[str] = frozenset()

    @property
    def known_volumes(self) -> set[str]:
        return set(_OUR_VOLUMES) | set(self.emptydirs)


def pod_config_violation(where: str, problem: str, fix: str | None = None) -> Violation:
    return Violation(
        "pod_config",
        f"{where} {problem}",
        fix
        or "remove it; a pod_config may set only what the box's allow-list names "
        "(see deskgpu's docs/house-rules.md)",
    )


# ---------------------------------------------------------------------------------------------
# Shapes


class Shape:
    """What a value may be; `describe()` is its docs text."""

    def describe(self) -> str:
        return "any value"

    def walk(self, value: Any, where: str, ctx: Context) -> Iterator[Violation]:
        return iter(())


@dataclass(frozen=True)
class AnyValue(Shape):
    text: str = "any value"

    def describe(self) -> str:
        return self.text


@dataclass(frozen=True)
class Only(Shape):
    """Allowed only with this value (what Kubernetes does without the key)."""

    value: Any
    rule: str
    why: str  # "{where} set to {value!r} <why>"
    fix: str

    def describe(self) -> str:
        return f"only `{_yaml(self.value)}`"

    def walk(self, value: Any, where: str, ctx: Context) -> Iterator[Violation]:
        if value != self.value:
            yield Violation(self.rule, f"{where} set to {value!r} {self.why}".rstrip(), self.fix)


@dataclass(frozen=True)
class OneOf(Shape):
    values: tuple[Any, ...]
    rule: str
    fix: str

    def describe(self) -> str:
        return " or ".join(f"`{_yaml(v)}`" for v in self.values)

    def walk(self, value: Any, where: str, ctx: Context) -> Iterator[Violation]:
        if value not in self.values:
            yield Violation(self.rule, f"{where}: {value!r}", self.fix)


@dataclass(frozen=True)
class Refused:
    """A key that must not appear, with the rule it breaks."""

    rule: str
    why: str  # "{where}: {value!r} <why>"
    fix: str


@dataclass(frozen=True)
class Obj(Shape):
    """A mapping: `fields` allowed (each with its shape), `refused` named, the rest refused."""

    fields: Mapping[str, Shape]
    refused: Mapping[str, Refused] = field(default_factory=dict)
    unknown_rule: str = "pod_config"
    unknown_fix: str | None = None
    checks: tuple[Callable[[Mapping[str, Any], str, Context], Iterator[Violation]], ...] = ()
    title: str = ""

    def describe(self) -> str:
        return "below"

    def walk(self, value: Any, where: str, ctx: Context) -> Iterator[Violation]:
        if value is None:  # as good as absent
            return
        if not isinstance(value, Mapping):
            yield pod_config_violation(where, "is not a mapping")
            return
        for key, item in value.items():
            here = f"{where}.{key}"
            if key in self.fields:
                yield from self.fields[key].walk(item, here, ctx)
            elif key in self.refused:
                r = self.refused[key]
                yield Violation(r.rule, f"{here}: {item!r} {r.why}", r.fix)
            elif self.unknown_rule == "pod_config":
                yield pod_config_violation(here, "is not allowed", self.unknown_fix)
            else:
                yield Violation(self.unknown_rule, f"{here} is not allowed", self.unknown_fix or "")
        for check in self.checks:
            yield from check(value, where, ctx)


@dataclass(frozen=True)
class Items(Shape):
    """A list, each item of `item`'s shape (`at_most` items)."""

    item: Shape
    at_most: int | None = None
    named: bool = True  # paths say `volumes deskgpu-data` rather than `volumes[0]`

    def describe(self) -> str:
        return self.item.describe()

    def walk(self, value: Any, where: str, ctx: Context) -> Iterator[Violation]:
        if not isinstance(value, list):
            yield pod_config_violation(where, "is not a list")
            return
        for i, item in enumerate(value):
            name = item.get("name") if self.named and isinstance(item, Mapping) else None
            yield from self.item.walk(item, f"{where} {name}" if name else f"{where}[{i}]", ctx)


@dataclass(frozen=True)
class Custom(Shape):
    """A rule that needs more than a key list (which volume a mount names, ...)."""

    fn: Callable[[Any, str, Context], Iterator[Violation]]
    text: str

    def describe(self) -> str:
        return self.text

    def walk(self, value: Any, where: str, ctx: Context) -> Iterator[Violation]:
        return self.fn(value, where, ctx)


def _yaml(value: Any) -> str:
    return "false" if value is False else "true" if value is True else str(value)


def walk(shape: Shape, value: Any, where: str, ctx: Context) -> list[Violation]:
    """Every way `value` departs from `shape`."""
    return list(shape.walk(value, where, ctx))


# ---------------------------------------------------------------------------------------------
# The rules that need more than a key list


_PRIVILEGE_FIX = (
    "remove it; the GPUs come through the NVIDIA device plugin without privileges, and a "
    "securityContext may only restrict (runAsUser, runAsNonRoot, capabilities.drop, ...)"
)
# Label/annotation key prefixes a request may not set: deskgpu's owner labels, Kueue's queue
# and priority, SkyPilot's own; and annotations that switch off AppArmor or seccomp.
_RESERVED_META = re.compile(
    r"^(deskgpu\.io/|kueue\.x-k8s\.io/|skypilot|.*apparmor|.*seccomp)", re.IGNORECASE
)
_DEVICE_FREE = re.compile(r"cpu|memory|ephemeral-storage|hugepages-.*")


def _meta_keys(value: Any, where: str, ctx: Context) -> Iterator[Violation]:
    if not isinstance(value, Mapping):
        yield pod_config_violation(where, "is not a mapping")
        return
    for name in value:
        if _RESERVED_META.match(str(name)):
            yield Violation(
                "pod_metadata",
                f"{where} sets {name!r}: reserved for the box (owner, queue, SkyPilot, "
                "AppArmor/seccomp)",
                "remove it; deskgpu sets the owner and queue labels itself",
            )


def _capabilities(value: Any, where: str, ctx: Context) -> Iterator[Violation]:
    if not isinstance(value, Mapping) or set(value) - {"add", "drop"}:
        yield Violation("privileged", f"{where}: capabilities may only drop", _PRIVILEGE_FIX)
    elif value.get("add"):
        yield Violation(
            "privileged",
            f"{where}: capabilities.add {list(value['add'])} (no capability may be added)",
            _PRIVILEGE_FIX,
        )


def _profile(value: Any, where: str, ctx: Context) -> Iterator[Violation]:
    kind = value.get("type") if isinstance(value, Mapping) else None
    if (
        not isinstance(value, Mapping)
        or str(kind) not in ("RuntimeDefault", "Localhost")
        or set(value) - {"type", "localhostProfile"}
    ):
        yield Violation(
            "privileged", f"{where}: {value!r} (only RuntimeDefault or Localhost)", _PRIVILEGE_FIX
        )


def _main_container_only(containers: Any, where: str, ctx: Context) -> Iterator[Violation]:
    if containers is None:
        return
    if not isinstance(containers, list):
        yield pod_config_violation(where, "is not a list")
        return
    for i, c in enumerate(containers):
        name = c.get("name") if isinstance(c, Mapping) else None
        if i > 0 or (name is not None and name != MAIN_CONTAINER):
            yield pod_config_violation(
                f"{where}[{i}]",
                f"adds a container {name or ''} beside SkyPilot's {MAIN_CONTAINER}",
                "use one container entry without a name (it is merged into the job's "
                "container); sidecars would run unchecked images",
            )
        if isinstance(c, Mapping):
            yield from CONTAINER.walk(c, f"{where}[{i}]", ctx)
        else:
            yield pod_config_violation(f"{where}[{i}]", "is not a mapping")


def _env_entry(e: Any, where: str, ctx: Context) -> Iterator[Violation]:
    if not isinstance(e, Mapping):
        return
    name = str(e.get("name") or "")
    if name.upper() in GPU_VISIBILITY_ENV:
        yield _gpu_env_violation(f"{where}")
    source = e.get("valueFrom")
    if isinstance(source, Mapping) and set(source) - {"fieldRef", "resourceFieldRef"}:
        yield pod_config_violation(
            f"{where}.valueFrom",
            "reads a Kubernetes Secret or ConfigMap",
            "put secrets in SkyPilot `secrets:` (redacted) instead",
        )


def _amounts(value: Any, where: str, ctx: Context) -> Iterator[Violation]:
    for key in value if isinstance(value, Mapping) else []:
        if not _DEVICE_FREE.fullmatch(str(key)):
            yield Violation(
                "gpu_outside_queue",
                f"{where} asks for {key}; GPUs and devices come only through "
                "`resources.accelerators`, where the queue and the limits see them",
                "remove it and ask with `accelerators:` / `--gpus`",
            )


def _mount(m: Any, where: str, ctx: Context) -> Iterator[Violation]:
    """Which volume a mount names, and how: data read-only, checkpoints only your own."""
    if not isinstance(m, Mapping):
        yield pod_config_violation(where, "has an entry that is not a mapping")
        return
    yield from MOUNT.walk(m, where, ctx)
    name = str(m.get("name"))
    path = str(m.get("mountPath") or "")
    who = safe_user(ctx.user)
    if name not in ctx.known_volumes:
        yield pod_config_violation(
            where,
            "mounts a volume this request does not define",
            f"mount {DATA_VOLUME}, {CHECKPOINT_VOLUME} or an emptyDir you add",
        )
    if name == DATA_VOLUME and m.get("readOnly") is not True:
        yield Violation(
            "data_read_only",
            f"{where} mounts {ctx.config.data_root} without `readOnly: true`",
            f"add `readOnly: true`; write to {CHECKPOINT_MOUNT}/{who} instead",
        )
    elif name == CHECKPOINT_VOLUME:
        sub = str(m.get("subPath") or "")
        parts = sub.split("/")
        if parts[0] != who or ".." in parts or sub.startswith("/"):
            yield Violation(
                "host_mount",
                f"{where} uses subPath {sub!r}; only {who!r} (your own checkpoints) may be mounted",
                f"use `subPath: {who}`, or drop the mount: deskgpu mounts it at "
                f"{CHECKPOINT_MOUNT}/{who}",
            )
    elif name not in _OUR_VOLUMES and _reserved(path):
        yield _reserved_violation(where, path)


# On a cluster a job lands where the per-node GPU rules judged it: selected by its node or
# its GPU type only (an attacker review placed jobs past the rules through other keys).
_CLUSTER_SELECTOR_KEYS = (HOSTNAME_LABEL, ACCELERATOR_LABEL, "nvidia.com/gpu.product")
_PIN_FIX = "pin the job with `node:` in the job spec (a nodeSelector on kubernetes.io/hostname)"


def _node_selector(value: Any, where: str, ctx: Context) -> Iterator[Violation]:
    """A pin to a node (`kubernetes.io/hostname`) must name one of the cluster's nodes; on a
    cluster nothing else but the GPU type may select a node."""
    if not isinstance(value, Mapping):
        yield pod_config_violation(where, "is not a mapping")
        return
    name = value.get(HOSTNAME_LABEL)
    if ctx.config.nodes and name is not None and ctx.config.node(str(name)) is None:
        yield unknown_node_violation(str(name), ctx.config, f"{where}.{HOSTNAME_LABEL}")
    if ctx.config.nodes:
        for key in value:
            if key not in _CLUSTER_SELECTOR_KEYS:
                yield pod_config_violation(
                    f"{where}.{key}",
                    "selects nodes by a label the per-node GPU rules do not judge",
                    _PIN_FIX,
                )


def _affinity(value: Any, where: str, ctx: Context) -> Iterator[Violation]:
    """On a cluster, node affinity would place a job past the per-node GPU rules; pod
    (anti-)affinity stays free."""
    if ctx.config.nodes and isinstance(value, Mapping) and "nodeAffinity" in value:
        yield pod_config_violation(
            f"{where}.nodeAffinity", "places the job past the per-node GPU rules", _PIN_FIX
        )


def _tolerations(value: Any, where: str, ctx: Context) -> Iterator[Violation]:
    """On a cluster, no toleration of every taint or of the node lifecycle's own
    (`node.kubernetes.io/*`: cordoned, not ready): a drained node stays drained."""
    if not ctx.config.nodes or not isinstance(value, list):
        return
    for i, t in enumerate(value):
        key = str(t.get("key") or "") if isinstance(t, Mapping) else ""
        if not key or key.startswith("node.kubernetes.io/"):
            yield pod_config_violation(
                f"{where}[{i}]",
                "tolerates every taint or a node's own (cordoned, not ready)",
                "tolerate only a named taint of the admin's, or drop it",
            )


def _volume(v: Any, where: str, ctx: Context) -> Iterator[Violation]:
    """The two standard volumes exactly as deskgpu writes them, and emptyDirs."""
    if not isinstance(v, Mapping):
        yield pod_config_violation(where, "is not a mapping")
        return
    ours = {o["name"]: o for o in _our_mounts(ctx.config, ctx.user)[1]}
    name = str(v.get("name"))
    if name in ours:
        if dict(v) != ours[name]:
            yield Violation(
                "host_mount",
                f"{where} is named like the box's standard volume but is not it",
                f"remove it; deskgpu adds {name} itself",
            )
    elif isinstance(v.get("hostPath"), Mapping):
        path = str(v["hostPath"].get("path") or "")
        yield _host_path_violation(path, False, f"{where} (hostPath)", ctx.config, ctx.user)
    elif set(v) != {"name", "emptyDir"}:
        yield pod_config_violation(
            where,
            "is not an emptyDir",
            "only emptyDir volumes may be added; data and checkpoints come from the "
            f"standard volumes {DATA_VOLUME} and {CHECKPOINT_VOLUME}",
        )


# ---------------------------------------------------------------------------------------------
# The allow-list

_SHARES_HOST = "shares the host's network or processes with the job"
_SECURITY_COMMON: dict[str, Shape] = {
    "runAsUser": AnyValue(),
    "runAsGroup": AnyValue(),
    "runAsNonRoot": AnyValue(),
    "seccompProfile": Custom(_profile, "`type: RuntimeDefault` or `Localhost`"),
    "appArmorProfile": Custom(_profile, "`type: RuntimeDefault` or `Localhost`"),
}
POD_SECURITY = Obj(
    {
        **_SECURITY_COMMON,
        "fsGroup": AnyValue(),
        "fsGroupChangePolicy": AnyValue(),
        "supplementalGroups": AnyValue(),
        "supplementalGroupsPolicy": AnyValue(),
    },
    unknown_rule="privileged",
    unknown_fix=_PRIVILEGE_FIX,
    title="pod `securityContext`",
)
CONTAINER_SECURITY = Obj(
    {
        **_SECURITY_COMMON,
        "readOnlyRootFilesystem": AnyValue(),
        "allowPrivilegeEscalation": Only(False, "privileged", "", _PRIVILEGE_FIX),
        "privileged": Only(False, "privileged", "", _PRIVILEGE_FIX),
        "capabilities": Custom(_capabilities, "`drop` only"),
        "procMount": OneOf(("Default",), "privileged", _PRIVILEGE_FIX),
    },
    unknown_rule="privileged",
    unknown_fix=_PRIVILEGE_FIX,
    title="container `securityContext`",
)
MOUNT = Obj(
    {
        "name": Custom(lambda v, w, c: iter(()), f"`{DATA_VOLUME}` (with `readOnly: true`), "
                       f"`{CHECKPOINT_VOLUME}` (with `subPath: <you>`), or an emptyDir the "
                       "request adds"),
        "mountPath": Custom(lambda v, w, c: iter(()), "not inside `/data` or `/checkpoints`, "
                            "but for the standard volumes"),
        "readOnly": AnyValue(),
        "subPath": AnyValue(),
        "recursiveReadOnly": AnyValue(),
    },
    title="`volumeMounts` entry",
)  # fmt: skip
RESOURCES = Obj(
    {
        "limits": Custom(_amounts, "cpu, memory, ephemeral-storage, hugepages-*"),
        "requests": Custom(_amounts, "cpu, memory, ephemeral-storage, hugepages-*"),
    },
    title="container `resources`",
)
CONTAINER = Obj(
    {
        "name": AnyValue(f"none, or `{MAIN_CONTAINER}` (merged into SkyPilot's container)"),
        "env": Items(Custom(_env_entry, "no GPU visibility variables, no Secret/ConfigMap "
                            "`valueFrom`"), named=True),
        "volumeMounts": Items(Custom(_mount, "below"), named=True),
        "resources": RESOURCES,
        "securityContext": CONTAINER_SECURITY,
        "workingDir": AnyValue(),
        "ports": AnyValue(),
    },
    refused={
        "image": Refused("pod_config", "is not allowed",
                         "use resources.image_id (checked against the box's image rules)"),
    },
    title="the one container",
)  # fmt: skip
METADATA = Obj(
    {
        "labels": Custom(_meta_keys, "not under `deskgpu.io/`, `kueue.x-k8s.io/`, `skypilot*`"),
        "annotations": Custom(_meta_keys, "not under `deskgpu.io/`, `kueue.x-k8s.io/`, "
                              "`skypilot*`, nor AppArmor/seccomp"),
    },
    unknown_fix="set only labels/annotations",
    title="`metadata` (and `custom_metadata`)",
)  # fmt: skip
_SERVICE_ACCOUNT = Refused(
    "service_account",
    "would give the job other Kubernetes credentials",
    "remove it; the house rules pick the pod's service account",
)
POD_SPEC = Obj(
    {
        "containers": Custom(_main_container_only, "one container, below"),
        "volumes": Items(Custom(_volume, "the two standard ones exactly as deskgpu writes "
                                "them, and `emptyDir`"), named=True),
        "securityContext": POD_SECURITY,
        "tolerations": Custom(_tolerations, "any, but on a cluster none of every taint or "
                              "of `node.kubernetes.io/*`"),
        "nodeSelector": Custom(_node_selector, f"with the host config's `nodes:`, "
                               f"`{HOSTNAME_LABEL}` only one of them"),
        "affinity": Custom(_affinity, "any, but on a cluster no `nodeAffinity` (use `node:`)"),
        "imagePullSecrets": AnyValue(),
        "terminationGracePeriodSeconds": AnyValue(),
        "dnsConfig": AnyValue(),
        "enableServiceLinks": AnyValue(),
        **{k: Only(False, "privileged", _SHARES_HOST, f"remove {k}")
           for k in ("hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace")},
        "automountServiceAccountToken": Only(
            False, "service_account", "would give the job other Kubernetes credentials",
            "remove automountServiceAccountToken; the house rules pick the pod's service "
            "account"),
    },
    refused={"serviceAccountName": _SERVICE_ACCOUNT, "serviceAccount": _SERVICE_ACCOUNT},
    title="`spec`",
)  # fmt: skip
POD_CONFIG = Obj(
    {"apiVersion": AnyValue(), "kind": AnyValue(), "metadata": METADATA, "spec": POD_SPEC},
    title="`pod_config`",
)
_TABLES = (POD_CONFIG, POD_SPEC, CONTAINER, MOUNT, RESOURCES, POD_SECURITY, CONTAINER_SECURITY,
           METADATA)  # fmt: skip


def readme_section() -> str:
    """docs/house-rules.md's allow-list: every key each part of a pod_config may hold, and how."""
    lines = [
        "<!-- generated from src/deskgpu/house_rules/podspec.py: "
        "uv run python -m deskgpu.house_rules -->",
        "Anything not listed is refused (`pod_config`, or the rule named):",
    ]
    for table in _TABLES:
        parts = []
        for key, shape in table.fields.items():
            text = shape.describe()
            plain = isinstance(shape, AnyValue) and text == "any value"
            parts.append(f"`{key}`" if plain else f"`{key}` ({text})")
        refused = [f"`{k}` ({r.rule})" for k, r in table.refused.items()]
        line = f"- {table.title}: " + ", ".join(parts)
        if refused:
            line += "; refused: " + ", ".join(refused)
        lines.append(line + ";")
    lines[-1] = lines[-1].rstrip(";") + "."
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# SkyPilot config sections

_SECTIONS = ("kubernetes", "ssh")


def sky_config_violations(
    cfg: Mapping[str, Any], config: HostConfig, user: str, *, where: str
) -> list[Violation]:
    """Violations in the `kubernetes` / `ssh` sections of a SkyPilot config mapping."""
    found: list[Violation] = []
    emptydirs: set[str] = set()
    pods: list[tuple[str, Any]] = []
    for section in _SECTIONS:
        body = cfg.get(section)
        if not isinstance(body, Mapping):
            continue
        scopes: list[tuple[str, Mapping[str, Any]]] = [(f"{where}.{section}", body)]
        contexts = body.get("context_configs")
        if isinstance(contexts, Mapping):
            scopes += [
                (f"{where}.{section}.context_configs.{ctx}", sub)
                for ctx, sub in contexts.items()
                if isinstance(sub, Mapping)
            ]
        for here, scope in scopes:
            found += _identity_violations(scope, here)
            meta = scope.get("custom_metadata")
            if meta is not None:
                found += walk(METADATA, meta, f"{here}.custom_metadata", Context(config, user))
            pod = scope.get("pod_config")
            if pod is None:
                continue
            pods.append((f"{here}.pod_config", pod))
            spec = pod.get("spec") if isinstance(pod, Mapping) else None
            for v in (spec.get("volumes") if isinstance(spec, Mapping) else None) or []:
                if isinstance(v, Mapping) and set(v) == {"name", "emptyDir"}:
                    emptydirs.add(str(v["name"]))
    ctx = Context(config, user, frozenset(emptydirs))
    for here, pod in pods:
        found += walk(POD_CONFIG, pod, here, ctx)
    return found


def _identity_violations(scope: Mapping[str, Any], where: str) -> list[Violation]:
    found: list[Violation] = []
    identity = scope.get("remote_identity")
    values = list(identity.values()) if isinstance(identity, Mapping) else [identity]
    bad = [v for v in values if v is not None and str(v) not in SAFE_REMOTE_IDENTITIES]
    if bad:
        found.append(
            Violation(
                "remote_identity",
                f"{where}.remote_identity {bad[0]!r} would run the job with the API server's "
                "Kubernetes credentials (LOCAL_CREDENTIALS) or a service account that may "
                "create pods (SERVICE_ACCOUNT, NO_UPLOAD, any other)",
                f"remove it; jobs run as the box's {JOB_SERVICE_ACCOUNT!r} service account",
            )
        )
    docker = scope.get("enable_docker")
    if docker not in (None, False):
        found.append(
            Violation(
                "privileged",
                f"{where}.enable_docker adds a privileged Docker-in-Docker sidecar (it could "
                "mount any disk of the host)",
                "remove it; build images elsewhere and run them with `image`",
            )
        )
    return found
