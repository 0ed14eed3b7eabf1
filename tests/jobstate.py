"""Jobs and sessions for a test API server, written into its HOME by SkyPilot's own state
functions before it starts (as bench/queue.py does): the server has no Kubernetes, so a
session that is up, or a job that got as far as the queue, cannot be made the live way.

`python -m tests.jobstate` in a process whose HOME is the server's writes:

- the caller's (`ME`, the Unix user running the suite): session `ME-dev` (UP, with an ssh
  address and a cluster YAML naming its ssh user and key, as a launch on k8s leaves them),
  managed jobs `ME-old` (1, SUCCEEDED), `ME-train` (2, PENDING, waiting for the
  controller), two PENDING jobs both named `ME-twin` (4, 5) and `ME-doomed` (6, for cancel);
- bob's: session `bob-notebook` (UP) and managed job `bob-train` (3, PENDING).

`python -m tests.jobstate alice bob` instead writes `<user>-dev` and `<user>-train` (jobs 1,
2, ... in that order) for each account named, as the guard would have recorded them, and the
session Transformer Lab launched for the first (`TL_CLUSTER`, INIT: waiting for GPUs).

`python -m tests.jobstate --queue alice bob` writes that and more of what the queue shows
(`fill_queue`): a finished and a failed job per account, an autodown on the first's session,
and the first's session and job in a workspace only the first may read (`PRIVATE_WORKSPACE`,
for a server config that declares it private).
"""

from __future__ import annotations

import asyncio
import os
import time

from deskgpu.identity import current_user, safe_user

ME = safe_user(current_user())
USERS = {ME: "a0000001", "bob": "b0000002"}  # SkyPilot user ids
SSH_IP = "10.42.0.7"
# Transformer Lab's first recorded launch (tests/fixtures/transformerlab).
TL_CLUSTER = "finetune-demo-5d0e9df8"
TL_JOB = "5d0e9df8-6a9d-43b3-9507-454e8cf9285e"
PRIVATE_WORKSPACE = "private-lab"


def _cluster(
    name: str, owner: str, home: str, *, ready: bool = True, labels: dict[str, str] | None = None
) -> None:
    import sky
    from sky import global_user_state
    from sky.backends.cloud_vm_ray_backend import CloudVmRayResourceHandle
    from sky.provision.kubernetes.utils import KubernetesInstanceType
    from sky.utils import auth_utils

    os.environ["SKYPILOT_USER_ID"] = USERS[owner]  # the owner add_or_update_cluster records
    key, _ = auth_utils.get_or_generate_keys()  # the owner's key pair, as a launch makes it
    res = sky.Resources(
        infra="k8s/default",
        instance_type=KubernetesInstanceType.from_resources(2, 8, 0, None).name,
        labels={"deskgpu.io/user": owner, "deskgpu.io/kind": "interactive", **(labels or {})},
    )
    yaml_path = f"{home}/.sky/generated/{name}.yml"
    global_user_state.set_cluster_yaml(
        name,
        "cluster_name: " + name + "-2ea4\n"
        "provider: {module: sky.provision.kubernetes}\n"
        f"auth: {{ssh_user: sky, ssh_private_key: '{key}'}}\n",
    )
    handle = CloudVmRayResourceHandle(
        cluster_name=name,
        cluster_name_on_cloud=f"{name}-2ea4",
        cluster_yaml=yaml_path,
        launched_nodes=1,
        launched_resources=res.copy(cloud=sky.clouds.Kubernetes(), region="default"),
        stable_internal_external_ips=[(SSH_IP, SSH_IP)],
        stable_ssh_ports=[22],
    )
    handle._ssh_user = "sky"  # what a launch caches on the handle (no public setter)
    global_user_state.add_or_update_cluster(name, handle, requested_resources={res}, ready=ready)


def _job(name: str, owner: str, finish: bool = False, workspace: str = "default") -> int:
    from sky.jobs import state

    job_id = int(
        state.set_job_info_without_job_id(
            name, workspace, "deskgpu submit", None, None, USERS[owner]
        )
    )
    state.set_pending(job_id, 0, name, "1x[CPU:1]", "{}")
    if finish:

        async def noop(*_args: object, **_kw: object) -> None:
            return None

        async def run() -> None:
            now = time.time()
            await state.set_starting_async(job_id, 0, f"run-{job_id}", now, "1x[CPU:1]", {}, noop)
            await state.set_started_async(job_id, 0, now, noop)
            await state.set_succeeded_async(job_id, 0, now + 60, noop)

        asyncio.run(run())
        state.scheduler_set_done(job_id, idempotent=True)
    return job_id


def fill_bound(users: list[str]) -> None:
    """For a server behind the guard: each of `users` owns session `<user>-dev` and managed
    job `<user>-train`, recorded under the id the guard gives the account."""
    from sky import global_user_state, models

    from deskgpu.callers import user_id_for

    home = os.environ["HOME"]
    for user in users:
        USERS[user] = user_id_for(user)
        global_user_state.add_or_update_user(models.User(id=USERS[user], name=user))
    for user in users:
        _cluster(f"{user}-dev", user, home)
    for user in users:
        _job(f"{user}-train", user)
    # What Transformer Lab launched for the first of them: still INIT, waiting for GPUs.
    _cluster(
        TL_CLUSTER,
        users[0],
        home,
        ready=False,
        labels={"deskgpu.io/via": "transformerlab", "deskgpu.io/frontend-job": TL_JOB},
    )


def fill_queue(users: list[str]) -> None:
    """`fill_bound`, then a finished and a failed managed job per account, autodown after an
    hour on the first's session, and the first's session `<user>-secret` and job
    `<user>-secret-train` in `PRIVATE_WORKSPACE`."""
    from sky import global_user_state, skypilot_config
    from sky.jobs import state

    fill_bound(users)
    home = os.environ["HOME"]
    first = users[0]
    global_user_state.set_cluster_autostop_value(f"{first}-dev", 60, True)
    for user in users:
        _job(f"{user}-done", user, finish=True)
        failed = _job(f"{user}-oom", user)
        state.set_failed(failed, None, state.ManagedJobStatus.FAILED_SETUP, "setup exited with 1")
    with skypilot_config.local_active_workspace_ctx(PRIVATE_WORKSPACE):
        _cluster(f"{first}-secret", first, home)
    _job(f"{first}-secret-train", first, workspace=PRIVATE_WORKSPACE)


def fill() -> None:
    from sky import global_user_state, models

    home = os.environ["HOME"]
    for user, user_hash in USERS.items():
        global_user_state.add_or_update_user(models.User(id=user_hash, name=user))
    _cluster(f"{ME}-dev", ME, home)
    _cluster("bob-notebook", "bob", home)
    _job(f"{ME}-old", ME, finish=True)
    _job(f"{ME}-train", ME)
    _job("bob-train", "bob")
    _job(f"{ME}-twin", ME)
    _job(f"{ME}-twin", ME)
    _job(f"{ME}-doomed", ME)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--queue"]:
        fill_queue(sys.argv[2:])
    elif sys.argv[1:]:
        fill_bound(sys.argv[1:])
    else:
        fill()
