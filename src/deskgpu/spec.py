"""The job spec (v1): load, check against the shipped schema, then what a schema can't express."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deskgpu import gpumodels
from deskgpu.config import KNOWN_INFRA, SYSTEM_CONFIG, HostConfig, is_box_infra
from deskgpu.errors import SpecError
from deskgpu.house_rules import DESKGPU_ENV, GPU_VISIBILITY_ENV, RESERVED_ENV_PREFIX
from deskgpu.house_rules.nodes import per_node_violation
from deskgpu.identity import MAX_CLUSTER_NAME, cluster_name, safe_user
from deskgpu.units import parse_duration_s
from deskgpu.validate import invalid_fields, load_schema, located_schema_problems
from deskgpu.yamlio import Located, read_located

SCHEMA = "jobspec-v1.json"


@dataclass(frozen=True)
class GpuRequest:
    """`A6000:2` -> model A6000, count 2; `2` -> any model; `0` -> CPU only."""

    count: int
    model: str | None = None

    @classmethod
    def parse(cls, value: int | float | str | None) -> GpuRequest:
        if value is None:
            return cls(0)
        if isinstance(value, (int, float)):  # JSON Schema counts 2.0 as an integer
            return cls(int(value))
        if ":" in value:
            model, count = value.split(":", 1)
            return cls(int(count), model)
        return cls(int(value))

    def __str__(self) -> str:
        if not self.count:
            return "0"
        return f"{self.model}:{self.count}" if self.model else str(self.count)


@dataclass(frozen=True)
class JobSpec:
    name: str
    gpus: GpuRequest = GpuRequest(0)
    image: str | None = None
    uv: bool = False
    workdir: str | None = None
    setup: str | None = None
    run: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    interactive: bool = False
    idle_timeout: str | None = None
    keep: bool = False
    infra: str | None = None
    node: str | None = None  # pinned to this node of the cluster
    nodes: int = 1  # SkyPilot's num_nodes
    source: str = "<spec>"
    # Where each top-level field's value sits in the file, for errors found after loading.
    field_marks: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False)

    def where(self, name: str) -> str:
        """`file:LINE:COL: name: ` for a field the spec sets, else `file: `."""
        if name in self.field_marks:
            line, col = self.field_marks[name]
            return f"{self.source}:{line}:{col}: {name}: "
        return f"{self.source}: "

    @property
    def kind(self) -> str:
        return "interactive" if self.interactive else "batch"


def load_spec(path: Path, config: HostConfig, user: str) -> JobSpec:
    """Read `path` and return a valid spec, or raise `SpecError` listing every problem
    (the workdir's too: one run of `--dry-run` names them all)."""
    doc = read_located(path)
    raw = doc.data if isinstance(doc.data, dict) else {}
    try:
        spec = spec_from_located(doc, config, user)
    except SpecError as exc:
        workdir = raw.get("workdir")
        uv = raw.get("uv") is True
        more, _ = _workdir_problems(doc, path, workdir if isinstance(workdir, str) else None, uv)
        if not more:
            raise
        lines = sorted([*exc.lines(), *(text for _, text in more)], key=_position)
        raise SpecError(lines) from None
    found, workdir = _workdir_problems(doc, path, spec.workdir, spec.uv)
    if found:
        raise SpecError([text for _, text in sorted(found)])
    return spec if workdir is None else replace(spec, workdir=workdir)


def _position(line: str) -> tuple[int, int]:
    """`file:LINE:COL: ...` -> (LINE, COL), for merging problems found by different checks."""
    import re

    found = re.match(r"^.*?:(\d+):(\d+): ", line)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def _workdir_problems(
    doc: Located, path: Path, workdir: str | None, uv: bool
) -> tuple[list[tuple[tuple[int, int], str]], str | None]:
    """The workdir's problems (located), and the resolved workdir when it is fine."""
    if workdir is None:
        if uv:
            return [
                doc.located(
                    ("uv",),
                    "builds the env from the workdir's pyproject.toml, and there is no workdir",
                    "add `workdir: .` next to your pyproject.toml",
                )
            ], None
        return [], None
    try:
        resolved = (path.parent / workdir).resolve(strict=True)
        is_dir = resolved.is_dir()
        has_project = (resolved / "pyproject.toml").is_file()
    except (OSError, RuntimeError, ValueError) as exc:  # missing, symlink loop, NUL byte
        reason = getattr(exc, "strerror", None) or str(exc)
        return [
            doc.located(("workdir",), f"cannot use {workdir!r}: {reason}", "fix the path")
        ], None
    if not is_dir:
        return [doc.located(("workdir",), f"{resolved} is not a directory", "fix the path")], None
    if uv and not has_project:
        return [
            doc.located(
                ("uv",),
                f"uv needs a pyproject.toml in the workdir {resolved}",
                "run `uv init` there, or set `uv: false`",
            )
        ], None
    return [], str(resolved)


def spec_from_located(doc: Located, config: HostConfig, user: str) -> JobSpec:
    schema = load_schema(SCHEMA)
    if isinstance(doc.data, dict) and _looks_like_host_config(doc.data):
        raise SpecError(
            [
                f"{doc.where(())}: this looks like a host config, not a job spec (it has "
                f"{', '.join(sorted(set(doc.data) & HOST_CONFIG_ONLY)[:3])}, ...): pass it with "
                f"`--config {doc.source}`, or render the box's files from it with "
                f"`deskgpu setup render --config {doc.source} --out DIR`"
            ]
        )
    found = [
        _better_gpus_hint(doc, item) for item in located_schema_problems(doc, schema, "job spec")
    ]
    if isinstance(doc.data, dict):
        found += semantic_problems(doc, config, user, skip=invalid_fields(doc, schema))
    if found:
        found.sort(key=lambda item: item[0])
        raise SpecError([text for _, text in found])
    data: dict[str, Any] = doc.data
    env = {key: _env_text(value) for key, value in (data.get("env") or {}).items()}
    return JobSpec(
        name=data["name"],
        gpus=GpuRequest.parse(data.get("gpus")),
        image=data.get("image"),
        uv=bool(data.get("uv", False)),
        workdir=data.get("workdir"),
        setup=data.get("setup"),
        run=data.get("run"),
        env=env,
        interactive=bool(data.get("interactive", False)),
        idle_timeout=data.get("idle_timeout"),
        keep=bool(data.get("keep", False)),
        infra=data.get("infra"),
        node=data.get("node"),
        nodes=int(data.get("nodes", 1)),
        source=doc.source,
        field_marks={key: doc.mark_of((key,)) for key in data},
    )


# Keys only a host config has: a spec carrying two of them is a host config given as a spec.
HOST_CONFIG_ONLY = frozenset(
    {"box_name", "data_root", "checkpoint_root", "default_image", "api_server",
     "kueue_local_queue", "max_idle_timeout", "max_gpus_per_job", "images", "admin_group",
     "trusted_frontends", "shared_logs", "frontend_gives_up_after", "state_dir", "protected",
     "reap", "doctor", "storage"}
)  # fmt: skip


def _looks_like_host_config(data: dict[str, Any]) -> bool:
    return len(set(data) & HOST_CONFIG_ONLY) >= 2


def _better_gpus_hint(doc: Located, item: Problem) -> Problem:
    """`gpus: "RTX A6000:1"` (the name `deskgpu queue` shows): suggest the model key."""
    value = doc.data.get("gpus") if isinstance(doc.data, dict) else None
    at, text = item
    if not isinstance(value, str) or ":" not in value or "gpus:" not in text:
        return item
    model, _, count = value.rpartition(":")
    key = gpumodels.model_key(model)
    if not count.strip().isdigit() or key == model:
        return item
    return at, text.rsplit(" (", 1)[0] + f" (did you mean `gpus: {key}:{count.strip()}`?)"


def _env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


Problem = tuple[tuple[int, int], str]


def semantic_problems(
    doc: Located, config: HostConfig, user: str, skip: set[str] | None = None
) -> list[Problem]:
    """Rules the schema can't express, on the fields that passed the schema."""
    data: dict[str, Any] = {k: v for k, v in doc.data.items() if k not in (skip or set())}
    problems: list[Problem] = []
    interactive = data.get("interactive") is True
    if "interactive" not in (skip or set()) and "run" not in (skip or set()):
        if not interactive and not (data.get("run") or "").strip():
            problems.append(
                doc.located(
                    ("run",) if "run" in data else (),
                    "a batch job needs `run`" if "run" not in data else "`run` is blank",
                    "add `run: python train.py`, or set `interactive: true` for a dev session",
                )
            )
        if interactive and "run" in data:
            problems.append(
                doc.located(
                    ("run",),
                    "an interactive session has no `run`",
                    "drop `run` and start work over `ssh`, or set `interactive: false`",
                    key=True,
                )
            )
    if not interactive and "interactive" not in (skip or set()):
        for key in ("idle_timeout", "keep"):
            if key in data:
                problems.append(
                    doc.located(
                        (key,),
                        "only applies to interactive sessions",
                        f"remove `{key}` or set `interactive: true`",
                        key=True,
                    )
                )
    if "idle_timeout" in data and interactive:
        seconds = parse_duration_s(data["idle_timeout"])
        if seconds < 60:
            problems.append(doc.located(("idle_timeout",), "is under a minute", "use e.g. `30m`"))
        elif seconds > config.max_idle_timeout_s:
            problems.append(
                doc.located(
                    ("idle_timeout",),
                    f"{data['idle_timeout']} is longer than this box allows "
                    f"({config.max_idle_timeout})",
                    f"use at most `{config.max_idle_timeout}`",
                )
            )
    if "infra" in data and "infra" not in (skip or set()):
        head = str(data["infra"]).split("/", 1)[0]
        if head not in KNOWN_INFRA:
            close = difflib.get_close_matches(head, KNOWN_INFRA, n=1, cutoff=0.5)
            hint = f"did you mean `{close[0]}`?" if close else "e.g. `aws`, `gcp` or `k8s`"
            problems.append(doc.located(("infra",), f"unknown infra `{head}`", hint))
    cloud = "infra" in data and not is_box_infra(data["infra"])
    problems += _node_problems(doc, config, data, cloud)
    if "gpus" in data and "infra" not in (skip or set()):
        request = GpuRequest.parse(data["gpus"])
        if config.nodes and not cloud:
            pin = data.get("node") if config.node(str(data.get("node"))) else None
            problems += _cluster_gpu_problems(doc, config, request, int(data.get("nodes", 1)), pin)
        else:
            problems += _gpu_problems(doc, config, request, cloud)
    for key in data.get("env") or {}:
        if str(key).upper() in GPU_VISIBILITY_ENV:
            problems.append(
                doc.located(
                    ("env", key),
                    f"`{key}` would pick GPUs behind the scheduler's back",
                    "remove it and ask for GPUs with `gpus:`; the job sees exactly those",
                    key=True,
                )
            )
        elif str(key).upper().startswith(RESERVED_ENV_PREFIX):
            problems.append(
                doc.located(
                    ("env", key),
                    f"`{key}` is set by deskgpu",
                    f"rename it; deskgpu sets {', '.join(DESKGPU_ENV[:-1])} and {DESKGPU_ENV[-1]}",
                    key=True,
                )
            )
    if "name" in data and data["name"].startswith(f"{safe_user(user)}-"):
        problems.append(
            doc.located(
                ("name",),
                f"already starts with your user prefix `{safe_user(user)}-`, which deskgpu adds",
                f"write `name: {data['name'][len(safe_user(user)) + 1 :]}`",
            )
        )
    elif "name" in data:
        full = cluster_name(user, data["name"])
        if len(full) > MAX_CLUSTER_NAME:
            room = MAX_CLUSTER_NAME - (len(full) - len(data["name"]))
            problems.append(
                doc.located(
                    ("name",),
                    f"`{full}` (user prefix + name) is {len(full)} characters; Kubernetes "
                    f"allows {MAX_CLUSTER_NAME} here",
                    f"shorten the name to at most {room} characters",
                )
            )
    return problems


def _gpu_problems(
    doc: Located, config: HostConfig, request: GpuRequest, cloud: bool
) -> list[Problem]:
    if not request.count:
        return []
    if request.model is None and (cloud or not config.gpus):
        if cloud:
            what = "a bare count needs a GPU model on a cloud run"
            fix = f"write the model, e.g. `gpus: A100:{request.count}`"
        else:
            what = (
                "a bare count needs the box's GPU inventory: the host config lists no GPUs "
                "and NVML sees none here"
            )
            where = config.source if config.source.startswith("/") else SYSTEM_CONFIG
            fix = (
                f"set `gpus:` in {where}, e.g. `gpus: {{A6000: 4}}`, or write the model: "
                f"`gpus: A6000:{request.count}`"
            )
        return [doc.located(("gpus",), what, fix)]
    if cloud or not config.gpus:
        return []  # the cloud has its own inventory; an empty inventory means "unknown"
    if request.model is None:
        available = config.gpu_count
        over = request.count > available
    else:
        models = {m.lower(): n for m, n in config.gpus.items()}
        if request.model.lower() not in models:
            return [
                doc.located(
                    ("gpus",),
                    f"this box has no {request.model} GPUs; it has {config.describe_gpus()}",
                    "ask for one of those models, or just a count like `gpus: 1`",
                )
            ]
        available = models[request.model.lower()]
        over = request.count > available
    if over:
        return [
            doc.located(
                ("gpus",),
                f"asks for {request.count} GPUs but this box has {config.describe_gpus()}",
                f"ask for at most {available}",
            )
        ]
    if config.max_gpus_per_job is not None and request.count > config.max_gpus_per_job:
        return [
            doc.located(
                ("gpus",),
                f"asks for {request.count} GPUs; the house rule is at most "
                f"{config.max_gpus_per_job} per job",
                f"ask for at most {config.max_gpus_per_job}, or talk to the box's admin",
            )
        ]
    return []


def _node_problems(
    doc: Located, config: HostConfig, data: dict[str, Any], cloud: bool
) -> list[Problem]:
    """`node:` names a node of the cluster, on the cluster."""
    if "node" not in data:
        return []
    name = str(data["node"])
    if cloud:
        return [
            doc.located(
                ("node",),
                f"pins the job to the lab's node {name}, and `infra` sends it elsewhere",
                "remove `node:` or `infra:`",
            )
        ]
    if not config.nodes:
        return [
            doc.located(
                ("node",),
                "this box is one node: the host config lists no `nodes:` to pin a job to",
                "remove `node:`",
            )
        ]
    if config.node(name) is None:
        return [
            doc.located(
                ("node",),
                f"no node {name!r} in the cluster; it has {config.describe_nodes()}",
                f"pin one of {', '.join(n.name for n in config.nodes)}, or remove `node:`",
            )
        ]
    return []


def _cluster_gpu_problems(
    doc: Located, config: HostConfig, request: GpuRequest, nodes: int, pin: str | None
) -> list[Problem]:
    """On a cluster: each of the job's pods gets one node's GPUs (`house_rules.nodes`)."""
    if not request.count:
        return []
    if request.model is None:
        options = [(m, float(request.count)) for m in config.gpus]
    elif request.model.lower() not in {m.lower() for m in config.gpus}:
        return [
            doc.located(
                ("gpus",),
                f"the cluster has no {request.model} GPUs; its nodes have "
                f"{config.describe_nodes()}",
                "ask for one of those models, or just a count like `gpus: 1`",
            )
        ]
    else:
        options = [(request.model, float(request.count))]
    broken = per_node_violation(config, options, nodes, pin)
    if broken is not None:
        return [doc.located(("gpus",), broken.problem, broken.fix)]
    total = request.count * nodes
    if config.max_gpus_per_job is not None and total > config.max_gpus_per_job:
        return [
            doc.located(
                ("gpus",),
                f"asks for {total} GPUs in all; the house rule is at most "
                f"{config.max_gpus_per_job} per job",
                f"ask for at most {config.max_gpus_per_job} in all, or talk to the box's admin",
            )
        ]
    return []
