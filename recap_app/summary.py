"""`recap summary RUN_URL`: what a run left behind (checkpoints, embedding logs, last metrics)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from recap_app.checkpoint import list_steps
from recap_app.storage import join, url_to_fs


def summarize(run_url: str) -> str:
    lines = [f"run: {run_url}"]
    complete, partial = list_steps(join(run_url, "checkpoints"))
    lines.append(f"  checkpoints/: complete steps {complete}" + (f", partial {partial}" if partial else ""))
    fs, emb = url_to_fs(join(run_url, "embeddings"))
    if fs.exists(emb):
        for step_dir in sorted(fs.ls(emb, detail=False)):
            tables = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(step_dir, detail=False))
            lines.append(f"  embeddings/{step_dir.rstrip('/').rsplit('/', 1)[-1]}/: {', '.join(tables)}")
    fs, metrics = url_to_fs(join(run_url, "metrics.jsonl"))
    if fs.exists(metrics):
        with fs.open(metrics, "r") as f:
            records = [json.loads(line) for line in f if line.strip()]
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
    print(summarize(parser.parse_args(argv).run))
    return 0
