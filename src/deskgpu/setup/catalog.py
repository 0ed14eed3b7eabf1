"""The accelerator catalog SkyPilot reads on the API server, written for the box's own GPUs,
so a GPU launch on a box without network gets past it.

What SkyPilot 0.14 reads (paths under `sky/`):

- Where: `catalog/common.py` `get_catalog_path` -> `$SKY_RUNTIME_DIR`, else the HOME of the
  server's process, + `.sky/catalogs/v8/` (`skylet/constants.py` `CATALOG_SCHEMA_VERSION`;
  `runtime_utils.get_runtime_dir_path`). The rendered unit sets HOME to the server's account.
- When a file is fetched: `catalog/common.py` `read_catalog(filename, pull_frequency_hours)`
  returns a lazy frame whose every load runs `_update_catalog`. Its `_need_update` fetches
  (`HOSTED_CATALOG_DIR_URL`, then the S3 mirror) only when the file is missing, or when
  `pull_frequency_hours` is set, `is_catalog_modified` is false and the file's mtime is older
  than that. `is_catalog_modified` is true when `.meta/<file>.md5` is missing (or differs):
  a file SkyPilot did not download itself is never fetched again, and never overwritten.
  These files carry no `.md5`, on purpose.
- What a Kubernetes (or SSH node pool) GPU request reads, `sky launch` and `sky jobs launch`
  alike: `common/accelerators.csv` (`utils/accelerator_registry.py` `_accelerator_df`, no pull
  frequency), from `canonicalize_accelerator_name` in `resources.py`
  `Resources._try_canonicalize_accelerators`, which `Resources.validate` runs, after the
  admin policy, from `server/server.py` `validate_dag` (the SDK's `/validate` before every
  launch), `execution.py` `launch` (`Task.validate`; the consolidated jobs controller
  launches through it too), `jobs/server/core.py` `_launch` (`dag.validate`), and again in
  `optimizer.py` `_fill_in_launchable_resources`. A name it lists (any case) is answered
  from it; a name it lacks is looked up on the cluster (`catalog.list_accelerators(clouds=
  'Kubernetes')`), which needs no network either. Columns: `AcceleratorName`, `Clouds` (a
  Python list, read only for partial-name matches).
- Nothing else on that path reads a CSV: Kubernetes instance types are built, not looked up
  (`clouds/kubernetes.py` `_get_feasible_launchable_resources`); prices come from the
  `kubernetes.pricing` config (`catalog/kubernetes_catalog.py` `get_hourly_cost`); the
  consolidated jobs controller uses the server's own catalog (`jobs/server/core.py`
  `_launch`: `get_modified_catalog_file_mounts` only for a remote controller). Up to
  provisioning this was traced on a real server (tests/test_catalog.py); past it, read.
- Not written here: `kubernetes/images.csv` (`catalog/kubernetes_catalog.py`
  `get_image_id_from_tag`, from `clouds/kubernetes.py` `make_deploy_resources_variables`)
  maps SkyPilot's default image tag to an image on the internet; it is read only for a task
  without an image, and the house rules give every task `default_image` when the host config
  sets one (a render note says so when it does not). `common/metadata.csv`
  (`accelerator_registry.get_devices_by_memory`) is read only for a request by memory
  (`--gpus 48GB+`), which deskgpu's specs never write. `aws/vms.csv` (`clouds/kubernetes.py`
  `_derive_efa_count_from_catalog`) only for `network_tier: best` on an autoscaled EKS node.

The inventory is the host config's `gpus:`, else what NVML sees on the host that renders.
Nothing is written for an infra that is not the box's (a cloud's own catalog must not be
shadowed by the box's GPUs). No SkyPilot import: the constants below are copies that a test
holds equal to SkyPilot's.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from deskgpu import gpumodels
from deskgpu.config import HostConfig
from deskgpu.snapshot import NvmlView

SCHEMA_VERSION = "v8"  # == sky.skylet.constants.CATALOG_SCHEMA_VERSION
CATALOG_DIR = "~/.sky/catalogs"  # == sky.skylet.constants.CATALOG_DIR (~: the server's HOME)
ACCELERATORS = "common/accelerators.csv"  # what sky.utils.accelerator_registry reads
ACCELERATOR_COLUMNS = ("AcceleratorName", "Clouds")
# str() of SkyPilot's cloud for each of the box's infra heads (sky.utils.registry).
CLOUD_OF_INFRA = {"k8s": "Kubernetes", "kubernetes": "Kubernetes", "ssh": "SSH"}


@dataclass(frozen=True)
class CatalogFile:
    path: str  # absolute, where install.sh puts it
    text: str
    purpose: str


def catalog_dir(home: str) -> str:
    return f"{home.rstrip('/')}/{CATALOG_DIR.removeprefix('~/')}/{SCHEMA_VERSION}"


def directories(home: str) -> list[str]:
    """The catalog's directories, parents first: the server's account must own them (SkyPilot
    writes `.meta/` and other clouds' catalogs there), not root as `install -D` leaves them."""
    root = catalog_dir(home)
    return [root.rsplit("/", 1)[0], root, f"{root}/{ACCELERATORS.rsplit('/', 1)[0]}"]


def _cloud(config: HostConfig) -> str | None:
    """SkyPilot's cloud for the box's infra; None for a cloud's infra (its own catalog)."""
    return CLOUD_OF_INFRA.get(config.infra.split("/", 1)[0])


def accelerators_csv(models: Iterable[str], cloud: str) -> str:
    """`common/accelerators.csv` listing `models`, each offered by `cloud` only."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(ACCELERATOR_COLUMNS)
    for model in dict.fromkeys(models):
        writer.writerow([model, repr([cloud])])
    return out.getvalue()


def seen_gpus(
    config: HostConfig, nvml_reader: Callable[[], NvmlView] | None = None
) -> dict[str, int]:
    """What NVML sees here, when the catalog would need it (on the box, no `gpus:`)."""
    if config.gpus or _cloud(config) is None:
        return {}
    if nvml_reader is None:
        from deskgpu import nvml

        nvml_reader = nvml.read
    view = nvml_reader()
    names = [g.name for g in view.gpus if not g.lost] if view.available else []
    return gpumodels.inventory(names) if names else {}


def box_catalog(home: str, config: HostConfig, seen: Mapping[str, int]) -> list[CatalogFile]:
    """The catalog files for the box's GPUs (`gpus:`, else `seen`); none off the box."""
    gpus = config.gpus or dict(seen)
    cloud = _cloud(config)
    if not gpus or cloud is None:
        return []
    where = "the host config's gpus:" if config.gpus else "what NVML sees"
    return [
        CatalogFile(
            f"{catalog_dir(home)}/{ACCELERATORS}",
            accelerators_csv(gpus, cloud),
            f"SkyPilot's accelerator catalog: the box's {', '.join(gpus)} ({where}), so a GPU "
            "launch needs no network",
        )
    ]


def notes(config: HostConfig, seen: Mapping[str, int]) -> list[str]:
    """What the admin should know about the catalog this render writes, or does not."""
    if _cloud(config) is None:
        return []
    out = []
    if not config.gpus and seen:
        shown = gpumodels.shown(dict(seen))
        out.append(
            f"the host config lists no GPUs: SkyPilot's accelerator catalog lists what NVML "
            f"sees here, {shown} (set `gpus: {shown}` to make that the inventory)"
        )
    elif not config.gpus:
        out.append(
            "no accelerator catalog written (no gpus: in the host config, no GPU NVML can "
            "read here): a GPU launch on a box without network will fail where SkyPilot "
            "downloads it; set gpus: and render again"
        )
    if not config.default_image:
        out.append(
            "no default_image: a job without `image:` runs SkyPilot's default image, which "
            "SkyPilot looks up in a catalog it downloads (kubernetes/images.csv) and k3s "
            "pulls from the internet; on a box without network, set default_image to an "
            "image k3s already has"
        )
    return out
