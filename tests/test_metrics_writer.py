"""metrics.jsonl and TensorBoard writes (recap_app/metrics_logger.py) against a real store: they never
hold up a training step, and a run that logs nothing leaves no TensorBoard file."""

from __future__ import annotations

import time

from recap_app.metrics_logger import MetricsWriter, read_metrics


def _wait_for(what: str, check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_writes_do_not_wait_for_a_hung_store(s3_server, monkeypatch):
    """The store freezes (accepts connections, never answers): queueing records still takes no time; once
    it answers again, close() leaves every record in the file."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    out = s3_server.url(f"metrics-hung-{time.monotonic_ns()}")
    writer = MetricsWriter(out, s3_server.storage_options, close_timeout_s=120)
    writer.write({"step": 1, "loss": 0.5})
    _wait_for(
        "the first record in the store", lambda: len(read_metrics(writer.url, s3_server.storage_options))
    )
    s3_server.pause()
    try:
        start = time.perf_counter()
        for step in range(2, 12):
            writer.write({"step": step, "loss": 1 / step, "lr": float("nan")})
        queued_in = time.perf_counter() - start
        time.sleep(1.0)  # the writer thread is now stuck in a request to the frozen store
        assert writer._thread.is_alive()
    finally:
        s3_server.resume()
    assert queued_in < 0.05, queued_in  # a synchronous write would have waited for the store
    writer.close()
    records = read_metrics(writer.url, s3_server.storage_options)
    assert [r["step"] for r in records] == list(range(1, 12))
    assert records[-1]["lr"] is None  # non-finite floats are written as null


def test_tensorboard_only_once_something_is_logged(tmp_path):
    idle = MetricsWriter(str(tmp_path / "idle"))
    idle.close()
    assert not (tmp_path / "idle" / "tensorboard").exists()  # a run with nothing to do adds no event file
    assert not (tmp_path / "idle" / "metrics.jsonl").exists()

    writer = MetricsWriter(str(tmp_path / "run"))
    writer.write({"step": 5, "loss": 0.25})
    writer.close()
    assert [p.name[:19] for p in (tmp_path / "run" / "tensorboard").iterdir()] == ["events.out.tfevents"]
    assert read_metrics(str(tmp_path / "run" / "metrics.jsonl")) == [{"loss": 0.25, "step": 5}]
    # Resumed from step 4: the earlier run's records after it are dropped.
    writer = MetricsWriter(str(tmp_path / "run"), resume_step=4)
    assert writer.records == []
    writer.close()
