"""`recap summary RUN_URL`: what a run left behind (checkpoints, embedding logs, last metrics)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from recap_app.checkpoint import list_steps
from recap_app.errors import InputError, exit_on_input_error
from recap_app.metrics_logger import read_metrics
from recap_app.storage import exists, join, ls


class RunNotFoundError(InputError):
    """`recap summary` of a URL that holds no run."""


def summarize(run_url: str) -> str:
    if not ls(run_url) and not exists(run_url):
        raise RunNotFoundError(f"no run at {run_url} (nothing there; give the --output of a run)")
    lines = [f"run: {run_url}"]
    complete, partial = list_steps(join(run_url, "checkpoints"))
    lines.append(f"  checkpoints/: complete steps {complete}" + (f", partial {partial}" if partial else ""))
    for step_dir in ls(join(run_url, "embeddings")):
        tables = [p.rsplit("/", 1)[-1] for p in ls(step_dir)]
        lines.append(f"  embeddings/{step_dir.rsplit('/', 1)[-1]}/: {', '.join(tables)}")
    records = read_metrics(join(run_url, "metrics.jsonl"))
    if records:
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval/loss" in r]
        lines.append(f"  metrics.jsonl: {len(records)} records")
        if train:
            r = train[-1]
            lines.append(
                f"  last train step {r['step']}: loss {r['loss']:.4f}, {r['examples_per_s']:.0f} examples/s"
            )
        if evals:
            r = evals[-1]
            lines.append(f"  last eval (step {r['step']}, {r['eval/examples']} examples):")
            for key in sorted(k for k in r if k.startswith("eval/auroc/")):
                task = key.removeprefix("eval/auroc/")
                lines.append(f"    {task}: AUROC {r[key]:.4f}  RCE {r[f'eval/rce/{task}']:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recap summary", description=__doc__)
    parser.add_argument("run", help="the run's output URL")
    with exit_on_input_error():
        print(summarize(parser.parse_args(argv).run))
    return 0
