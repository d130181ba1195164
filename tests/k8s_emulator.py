"""A Kubernetes API emulator on 127.0.0.1 for the TorchX kubernetes scheduler tests (no cluster needed).

`kmock.KubernetesEmulator` keeps objects in memory and answers create/get/patch/delete/list like an API
server, with two gaps that matter here:

- its create answers 200, while a real API server answers 201 and the kubernetes client only decodes
  the 201 body of `create_namespaced_custom_object` (with 200 it returns None and TorchX's
  `schedule()` fails on `resp["metadata"]`); `VolcanoEmulator` answers 201;
- nothing plays the Volcano controller: a test sets `.status` itself through the `/status`
  subresource (`set_status`), the way the controller would.

The server runs on its own event loop in a daemon thread, so synchronous clients (the kubernetes client
in this process, the `torchx` CLI in a subprocess) can talk to it; `inspect` reads its state on that loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kmock
import yaml
from kmock import action

GROUP, VERSION, PLURAL = "batch.volcano.sh", "v1alpha1", "jobs"
T = TypeVar("T")


class VolcanoEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the API server's status code for create (201 Created)."""

    async def _handle(self, request: kmock.Request) -> Any:
        response = await super()._handle(request)
        if request.action == action.CREATE and response.status == 200 and not response.prepared:
            response.set_status(201)
        return response


@dataclass
class Emulator:
    handler: VolcanoEmulator
    loop: asyncio.AbstractEventLoop
    url: str
    kubeconfig: Path

    def inspect(self, fn: Callable[[VolcanoEmulator], T]) -> T:
        """Run `fn(handler)` on the server's loop (no request is half-handled while it runs)."""

        async def call() -> T:
            return fn(self.handler)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=10)

    def requests(self) -> list[kmock.Request]:
        """Every request the server received, in order."""
        return self.inspect(list)

    def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The stored Volcano Job, or None when absent or deleted."""

        def get(handler: VolcanoEmulator) -> dict[str, Any] | None:
            key = (kmock.resource(GROUP, VERSION, PLURAL), namespace, name)
            if key not in handler.objects or handler.objects[key].deleted:
                return None
            return handler.objects[key].raw

        return self.inspect(get)

    def api_client(self) -> Any:
        """A kubernetes ApiClient configured from the written kubeconfig (as TorchX would load it)."""
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=configuration)
        return client.ApiClient(configuration)

    def set_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Replace the Job's status through its /status subresource over HTTP, as the Volcano
        controller would: a merge PATCH clearing it, then one setting it (one merge PATCH alone would
        keep earlier pod phases next to the new ones; the emulator has no PUT on /status)."""
        from kubernetes import client

        with self.api_client() as api:
            jobs = client.CustomObjectsApi(api)
            for body in ({"status": None}, {"status": status}):
                job = jobs.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, PLURAL, name, body
                )
            return job


def write_kubeconfig(path: Path, server: str, namespace: str = "default") -> Path:
    """A kubeconfig with one context pointing at `server`; no credentials (the emulator needs none)."""
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emulator", "cluster": {"server": server}}],
                "users": [{"name": "emulator", "user": {}}],
                "contexts": [
                    {
                        "name": "emulator",
                        "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace},
                    }
                ],
                "current-context": "emulator",
            }
        )
    )
    return path


@contextmanager
def running_emulator(tmp_dir: Path, namespace: str = "default") -> Iterator[Emulator]:
    """Start `VolcanoEmulator` on a free port of 127.0.0.1 and write a kubeconfig for it."""
    started = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        try:
            async with VolcanoEmulator() as handler, kmock.Server(handler, host="127.0.0.1") as server:
                state.update(handler=handler, port=server.port, loop=asyncio.get_running_loop())
                state["stop"] = asyncio.Event()
                started.set()
                await state["stop"].wait()
        except BaseException as e:  # surface start-up failures to the waiting thread
            state["error"] = e
            started.set()
            raise

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="k8s-emulator", daemon=True)
    thread.start()
    if not started.wait(timeout=30):
        raise RuntimeError("Kubernetes emulator did not start within 30 s")
    if "error" in state:
        raise RuntimeError("Kubernetes emulator failed to start") from state["error"]
    url = f"http://127.0.0.1:{state['port']}"
    kubeconfig = write_kubeconfig(tmp_dir / "kubeconfig", url, namespace)
    try:
        yield Emulator(handler=state["handler"], loop=state["loop"], url=url, kubeconfig=kubeconfig)
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(timeout=10)
