"""Real 2-rank (gloo) sharding checks: one torchrun launch of tests/dist_scripts/shard_check.py covers
table_wise, column_wise, data_parallel and row_wise (the CPU row-wise sharder); these tests assert on the
JSON each rank wrote and on the tables rank 0 wrote through log_sharded_tensor_content's output_url."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recap_app.model import load_embedding_table

SCRIPT = Path(__file__).parent / "dist_scripts" / "shard_check.py"
REPO = Path(__file__).resolve().parents[1]
SHARDING_TYPES = ["table_wise", "column_wise", "data_parallel", "row_wise"]
TABLES = ["t0", "t1"]
WORLD = 2
ATOL = 1e-5

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("shard_check")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(WORLD),
        str(SCRIPT),
        str(out),
        *SHARDING_TYPES,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}")
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def cases(run: tuple[Path, list[dict]], sharding_type: str) -> list[dict]:
    return [r["cases"][sharding_type] for r in run[1]]


def test_both_ranks_ran_all_types(run):
    _, results = run
    for r in results:
        assert r["world_size"] == WORLD
        assert r["local_world_size"] == WORLD
        assert sorted(r["cases"]) == sorted(SHARDING_TYPES)


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_plan_uses_the_constrained_type(run, sharding_type):
    per_rank = cases(run, sharding_type)
    assert per_rank[0]["plan"] == per_rank[1]["plan"], "ranks must agree on one plan"
    plan = per_rank[0]["plan"]
    assert sorted(plan) == TABLES
    for table, p in plan.items():
        assert p["sharding_type"] == sharding_type, (table, p)
        if sharding_type == "table_wise":
            assert len(p["ranks"]) == 1, (table, p)
        else:  # split (column/row) or replicated (data_parallel) over both ranks
            assert p["ranks"] == [0, 1], (table, p)
    if sharding_type == "table_wise":
        # The two tables on different ranks, so the gather below moves a table from rank 1 to rank 0.
        assert {plan[t]["ranks"][0] for t in TABLES} == {0, 1}, plan
    assert not per_rank[0]["is_same_object"], "distributed: maybe_shard_model must return a DMP"
    # Rank 1 built its model from another seed; the checks below compare with rank 0's model.
    assert not per_rank[0]["rank_model_differs"] and per_rank[1]["rank_model_differs"]


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_gather_gives_full_table_on_rank0_only(run, sharding_type):
    rank0, rank1 = cases(run, sharding_type)
    assert rank0["gathered_tables"] == TABLES and rank1["gathered_tables"] == TABLES
    assert rank0["gathered_is_none"] == {t: False for t in TABLES}
    assert rank1["gathered_is_none"] == {t: True for t in TABLES}
    # Sharding kept the model's initial tables (torchrec alone re-initialises them on CPU), and the
    # gather put every shard back in its place: exact equality.
    assert rank0["initial_table_diff"] == {t: 0.0 for t in TABLES}


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_gathered_tables_written_by_rank0_load_back(run, sharding_type):
    out, _ = run
    case = cases(run, sharding_type)[0]
    url = case["output_url"]
    assert url.startswith("file://") if sharding_type in ("table_wise", "row_wise") else "://" not in url
    reference = torch.load(out / sharding_type / "reference_tables.pt")
    for table in TABLES:
        loaded = load_embedding_table(url, table)
        assert loaded.shape == reference[table].shape
        assert torch.equal(loaded, reference[table]), table


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_forward_on_each_half_matches_unsharded(run, sharding_type):
    for rank, case in enumerate(cases(run, sharding_type)):
        assert case["loss"] == pytest.approx(case["ref_loss"], abs=ATOL), rank
        diffs = case["forward_diff"]
        assert {"logits", "probabilities", "calibrated_probabilities", "loss", "labels", "weights"} <= set(
            diffs
        )
        assert any(k.startswith("loss/") for k in diffs)
        for key, diff in diffs.items():
            assert diff <= ATOL, (rank, key, diff)


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_dense_gradients_average_over_ranks_like_ddp(run, sharding_type):
    for rank, case in enumerate(cases(run, sharding_type)):
        grads = case["grad_diff"]
        assert len(grads) > 20
        assert case["max_grad"] > 1e-3  # the comparison is not between zeros
        for name, diff in grads.items():
            assert diff is not None, f"rank {rank}: {name} has no gradient"
            assert diff <= ATOL, (rank, name, diff)
        assert case["param_diff_after_step"] <= ATOL


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_tables_after_one_sgd_step_match_unsharded(run, sharding_type):
    rank0, _ = cases(run, sharding_type)
    for table in TABLES:
        assert rank0["table_change"][table] > 1e-3  # the step did move the table
        assert rank0["table_diff_after_step"][table] <= ATOL, table


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_only_data_parallel_tables_go_to_the_dense_optimizer(run, sharding_type):
    names = cases(run, sharding_type)[0]["dense_param_names"]
    tables = sorted(n for n in names if "embedding_bags" in n)
    expected = (
        [f"model.embedding_bag_collection.embedding_bags.{t}.weight" for t in TABLES]
        if sharding_type == "data_parallel"
        else []
    )
    assert tables == expected


def test_planning_error_is_raised_on_every_rank(run):
    _, results = run
    for rank, r in enumerate(results):
        assert r["plan_error"] is not None, rank
        assert "No available sharding type" in r["plan_error"], r["plan_error"]
    assert "rank 0" in results[1]["plan_error"]
