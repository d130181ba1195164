"""Resume guards: a run resumed with another world size or per-rank batch is refused (its data position
would not be exact), naming both values; the same world size and batch resume."""

from __future__ import annotations

import sys

from e2e_lib import run, torchrun

SMALL = ["training.log_every_n=10", "eval.every_n=0", "eval.num_batches=1", "embedding_log.every_n=0"]


def test_resume_with_another_world_size_is_refused(tmp_path):
    out = str(tmp_path / "run")
    run(
        [
            sys.executable,
            "-m",
            "recap_app.cli",
            "train",
            "--output",
            out,
            "training.num_train_steps=2",
            *SMALL,
        ]
    )
    res = run(
        torchrun(2, "-m", "recap_app.train", "--output", out, "training.num_train_steps=4", *SMALL),
        check=False,
        timeout=120,
    )
    assert res.returncode != 0
    errors = {line for line in res.output.splitlines() if line.startswith("recap: error:")}
    assert errors == {
        f"recap: error: cannot resume {out}/checkpoints: trained with world size 1 and per-rank batch 256, "
        "this run has world size 2 and per-rank batch 128 (its data position would not be exact); use the "
        "same -j and data.global_batch_size, or a new --output"
    }, res.tail()
    res = run(
        [
            sys.executable,
            "-m",
            "recap_app.cli",
            "train",
            "--output",
            out,
            "training.num_train_steps=4",
            *SMALL,
        ]
    )
    assert f"resumed from {out}/checkpoints/step-2 at step 2" in res.output
