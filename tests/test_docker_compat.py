"""recap_app.docker_compat on container states seen from podman 4.3.1's Docker API; no podman needed.

tests/cluster/test_local_docker.py runs the same scheduler against real podman containers."""

from importlib import metadata

import pytest
from docker.models.containers import Container
from torchx.schedulers.docker_scheduler import DockerScheduler
from torchx.specs import AppState

from recap_app.docker_compat import RecapDockerScheduler, container_state, create_scheduler


def _container(status: str) -> Container:
    """docker-py's container object as `containers.list()` / `reload()` leave it, without a client."""
    return Container(attrs={"Id": "c0", "State": {"Status": status}})


def _exit_code(code: int):
    def ask() -> int:
        asked.append(code)
        return code

    asked: list[int] = []
    return ask, asked


def test_upstream_crashes_on_stopped():
    """The torchx 0.7.0 bug this module exists for; drop docker_compat once this test fails."""
    with pytest.raises(KeyError, match="stopped"):
        DockerScheduler("t")._get_app_state(_container("stopped"))


@pytest.mark.parametrize(
    "status, code, expected",
    [
        ("stopped", 0, AppState.SUCCEEDED),  # podman: exited, cleanup pending
        ("stopped", 1, AppState.FAILED),
        ("exited", 0, AppState.SUCCEEDED),
        ("exited", 137, AppState.FAILED),
    ],
)
def test_exited_states_read_the_exit_code(status, code, expected):
    ask, asked = _exit_code(code)
    assert container_state(status, ask) == expected
    assert asked == [code]


@pytest.mark.parametrize(
    "status, expected",
    [
        ("configured", AppState.SUBMITTED),
        ("initialized", AppState.SUBMITTED),
        ("created", AppState.SUBMITTED),
        ("running", AppState.RUNNING),
        ("stopping", AppState.RUNNING),
        ("paused", AppState.PENDING),
        ("dead", AppState.FAILED),
        ("some-future-state", AppState.UNKNOWN),
    ],
)
def test_other_states_do_not_ask_for_an_exit_code(status, expected):
    ask, asked = _exit_code(0)
    assert container_state(status, ask) == expected
    assert asked == []


def test_scheduler_reads_running_container():
    assert RecapDockerScheduler("t")._get_app_state(_container("running")) == AppState.RUNNING
    assert RecapDockerScheduler("t")._get_app_state(_container("stopping")) == AppState.RUNNING


def test_registered_as_local_docker():
    eps = {ep.name: ep for ep in metadata.entry_points(group="torchx.schedulers")}
    assert eps["local_docker"].load() is create_scheduler
    assert isinstance(create_scheduler("t"), RecapDockerScheduler)
