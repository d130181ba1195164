"""What recap's fixed TorchX schedulers (slurm_compat, kubernetes_compat) share."""

from __future__ import annotations

from collections.abc import Iterable

from torchx.schedulers.api import DescribeAppResponse
from torchx.specs import AppDef, AppState, ReplicaStatus, Role, RoleStatus

from recap_app.errors import SubmitError


def require_images(app: AppDef, scheduler: str) -> None:
    """Container schedulers run each role in its image: refuse a role without one (recap's components
    leave `--image` empty to mean "this machine", whose paths a container does not have)."""
    for role in app.roles:
        if not role.image:
            raise SubmitError(
                f"-s {scheduler} runs role {role.name!r} in a container image: pass --image, e.g. --image "
                "ghcr.io/your-org/recap:0.1.0-cpu (`make image IMAGE_REPO=ghcr.io/your-org/recap` builds it)"
            )


def describe_response(
    app_id: str, state: AppState, replicas: Iterable[tuple[str, int, AppState]], msg: str = ""
) -> DescribeAppResponse:
    """A ``describe`` answer from the app's state and its replicas as (role, replica id, state), grouped
    by role the way torchx's own schedulers report them."""
    roles: dict[str, Role] = {}
    roles_statuses: dict[str, RoleStatus] = {}
    for role, replica_id, replica_state in replicas:
        if role not in roles:
            roles[role] = Role(name=role, num_replicas=0, image="")
            roles_statuses[role] = RoleStatus(role, [])
        roles[role].num_replicas += 1
        roles_statuses[role].replicas.append(
            ReplicaStatus(id=replica_id, role=role, state=replica_state, hostname="")
        )
    return DescribeAppResponse(
        app_id=app_id,
        roles=list(roles.values()),
        roles_statuses=list(roles_statuses.values()),
        state=state,
        msg=msg,
    )
