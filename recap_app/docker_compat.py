"""TorchX 0.7.0's ``local_docker`` scheduler with podman's container states understood.

``DockerScheduler`` in torchx 0.7.0 maps a container's status through ``CONTAINER_STATE``, which holds
Docker's words only. Podman's Docker-compatible API (``podman system service``, what this project's
machines have instead of a Docker daemon) also reports libpod's own states; the one every job meets is
``stopped``: the process has exited and podman has not yet run its cleanup, for a fraction of a second.
A ``torchx run --wait`` / ``torchx status`` that looks then crashes with ``KeyError: 'stopped'``.

:class:`RecapDockerScheduler` changes only how a container's state is read: ``stopped`` is an exited
container (its exit code decides SUCCEEDED or FAILED, as for ``exited``), podman's other extra states
map to their Docker equivalents, and a state neither knows is UNKNOWN instead of a crash. Submission,
networking, mounts, logs and cancel are torchx's. It is registered as ``local_docker`` in
``pyproject.toml``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torchx.schedulers.docker_scheduler import CONTAINER_STATE, DockerScheduler
from torchx.specs import AppDef, AppState

from recap_app.scheduler_compat import require_images

if TYPE_CHECKING:
    from docker.models.containers import Container

# libpod states (podman's define.ContainerStatus) that its compat API passes through, as Docker words.
PODMAN_STATUS: dict[str, str] = {
    "configured": "created",
    "initialized": "created",
    "stopping": "running",  # the stop signal is sent, the process still runs
    "stopped": "exited",  # exited, podman's cleanup not run yet
}


def container_state(status: str, exit_code: Callable[[], int]) -> AppState:
    """TorchX state of a container status from Docker or podman; ``exit_code`` is asked for exited ones."""
    status = PODMAN_STATUS.get(status, status)
    if status == "exited":
        return AppState.SUCCEEDED if exit_code() == 0 else AppState.FAILED
    return CONTAINER_STATE.get(status, AppState.UNKNOWN)


class RecapDockerScheduler(DockerScheduler):
    """torchx 0.7.0's ``local_docker``; reads podman's container states as well as Docker's."""

    def _validate(self, app: AppDef, scheduler: str) -> None:
        require_images(app, scheduler)

    def _get_app_state(self, container: Container) -> AppState:
        # As torchx: Docker has no succeeded/failed states, the exit code from wait() tells.
        return container_state(container.status, lambda: container.wait(timeout=10)["StatusCode"])


def create_scheduler(session_name: str, **kwargs: Any) -> RecapDockerScheduler:
    return RecapDockerScheduler(session_name=session_name)
