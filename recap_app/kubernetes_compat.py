"""TorchX 0.7.0's Kubernetes (Volcano) scheduler with its status reading fixed.

``KubernetesScheduler`` in torchx 0.7.0 looks a Volcano Job's phase up in ``JOB_STATE``, which lacks
``Completing`` (the phase between the last task finishing and ``Completed``): ``torchx status``,
``torchx list`` and ``torchx run --wait`` crash with ``KeyError: 'Completing'`` at the end of every
successful job. Its ``describe`` also lets the API's 404 escape for a job that no longer exists
(after ``torchx cancel``, or once Kubernetes garbage-collects it), where the scheduler contract is to
return ``None``, so the CLI prints a traceback instead of "does not exist".

:class:`RecapKubernetesScheduler` changes ``describe`` and ``list``, and adds one run option,
``termination_grace_period_s`` (default 120): every pod's ``terminationGracePeriodSeconds``, the time
between the SIGTERM of a pod deletion or eviction and its SIGKILL (Kubernetes' default is 30 s), so the
trainer can agree on a step and save it (recap_app/preemption.py). Submission, logs and cancel are
torchx's. It is registered as the ``kubernetes`` scheduler in ``pyproject.toml``.
"""

from __future__ import annotations

from typing import Any

from torchx.schedulers.api import DescribeAppResponse, ListAppResponse
from torchx.schedulers.kubernetes_scheduler import JOB_STATE, TASK_STATE, KubernetesJob, KubernetesScheduler
from torchx.specs import AppDef, AppDryRunInfo, AppState, runopts

from recap_app.scheduler_compat import describe_response, require_images

# Volcano's job phases (volcano.sh/apis batch/v1alpha1 JobPhase), every one of them mapped.
VOLCANO_JOB_STATES: dict[str, AppState] = {
    **JOB_STATE,
    "Completing": AppState.RUNNING,  # tasks done, Volcano still cleaning up: not terminal yet
}

# Pods' terminationGracePeriodSeconds: torchrun gives its workers 30 s after the SIGTERM; the rest is margin.
DEFAULT_GRACE_S = 120
_VOLCANO = {"group": "batch.volcano.sh", "version": "v1alpha1", "plural": "jobs"}


def job_state(phase: str | None) -> AppState:
    """TorchX state of a Volcano Job phase; UNKNOWN for none yet or one a newer Volcano may add."""
    return VOLCANO_JOB_STATES.get(phase, AppState.UNKNOWN)


def parse_volcano_job(app_id: str, job: dict[str, Any]) -> DescribeAppResponse:
    """torchx 0.7.0's ``describe`` reading of a Volcano Job object, phases fixed."""
    status = job.get("status") or {}
    phase = (status.get("state") or {}).get("phase")
    replicas = []
    for task, counts in (status.get("taskStatusCount") or {}).items():
        role, _, idx = task.rpartition("-")  # torchx names each replica's task "<role>-<replica id>"
        pod_phase = next(iter(counts.get("phase") or {}), "Unknown")
        replicas.append((role, int(idx), TASK_STATE.get(pod_phase, AppState.UNKNOWN)))
    return describe_response(app_id, job_state(phase), replicas, msg=phase or "")


class RecapKubernetesScheduler(KubernetesScheduler):
    """torchx 0.7.0's ``kubernetes`` scheduler; status survives ``Completing`` and deleted jobs, and pods
    get a termination grace period long enough for a preemption checkpoint."""

    def _run_opts(self) -> runopts:
        opts = super()._run_opts()
        opts.add(
            "termination_grace_period_s",
            type_=int,
            default=DEFAULT_GRACE_S,
            help="seconds between a pod's SIGTERM and its SIGKILL (recap saves the step it reached)",
        )
        return opts

    def _submit_dryrun(self, app: AppDef, cfg: Any) -> AppDryRunInfo[KubernetesJob]:
        info = super()._submit_dryrun(app, cfg)
        grace = cfg.get("termination_grace_period_s", DEFAULT_GRACE_S)
        for task in info.request.resource["spec"]["tasks"]:
            task["template"].spec.termination_grace_period_seconds = grace
        return info

    def _validate(self, app: AppDef, scheduler: str) -> None:
        require_images(app, scheduler)

    def describe(self, app_id: str) -> DescribeAppResponse | None:
        from kubernetes.client.rest import ApiException

        namespace, name = app_id.split(":")
        try:
            job = self._custom_objects_api().get_namespaced_custom_object_status(
                namespace=namespace, name=name, **_VOLCANO
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return parse_volcano_job(app_id, job)

    def list(self) -> list[ListAppResponse]:
        namespace = self._get_active_context()["context"]["namespace"]
        resp = self._custom_objects_api().list_namespaced_custom_object(
            namespace=namespace, timeout_seconds=30, **_VOLCANO
        )
        return [
            ListAppResponse(
                app_id=f"{namespace}:{job['metadata']['name']}",
                state=parse_volcano_job("", job).state,
            )
            for job in resp["items"]
        ]


def create_scheduler(
    session_name: str, client: Any = None, docker_client: Any = None, **kwargs: Any
) -> RecapKubernetesScheduler:
    return RecapKubernetesScheduler(session_name=session_name, client=client, docker_client=docker_client)
