"""Worker for tests/test_sharding_distributed.py; run by torchrun with 2 ranks on gloo.

usage: torchrun --nproc_per_node 2 shard_check.py OUT_DIR [SHARDING_TYPE ...]

For each sharding type: a tiny RecapRanker in ModelAndLoss, an unsharded deep copy as the reference, the
original sharded by maybe_shard_model with every table constrained to that type. Checks (measured here,
asserted by the pytest test from OUT_DIR/rank{R}.json):
- the plan uses the type, and for which ranks;
- the tables gathered by log_sharded_tensor_content equal the reference tables (rank 0) / None (rank 1),
  and rank 0 wrote them to output_url (reference tables saved beside, for the test to compare);
- forward on this rank's half of a global batch equals the reference forward on that half;
- backward: dense gradients equal the reference gradients of the mean of the two half-batch losses
  (what DDP computes); after a dense SGD step plus the in-backward SGD of the tables, the gathered tables
  equal the reference tables after the same SGD step on the reference.
Failures are recorded as numbers; exceptions end the run with a non-zero exit.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recap_testlib import NUM_BINARY, NUM_CONTINUOUS, TASKS, make_examples, tiny_model_config  # noqa: E402

from recap_app.loss import build_multi_task_loss  # noqa: E402
from recap_app.model import (  # noqa: E402
    ModelAndLoss,
    embedding_weights,
    log_sharded_tensor_content,
    maybe_shard_model,
)
from recap_app.ranker import RecapRanker  # noqa: E402

LR = 0.5
GLOBAL_BATCH = 8
EBC = "model.embedding_bag_collection"


def tables_for(sharding_type: str) -> list[dict]:
    # column_wise splits only dims that are multiples of 128 (torchrec's MIN_CW_DIM): 256 -> 2 shards.
    dim = 256 if sharding_type == "column_wise" else 8
    # 31 rows: an uneven row_wise split.
    return [
        {"name": "t0", "num_embeddings": 20, "embedding_dim": dim, "feature_names": ["f_user"]},
        {"name": "t1", "num_embeddings": 31, "embedding_dim": dim, "feature_names": ["f_author", "f_tweet"]},
    ]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.detach().float() - b.detach().float()).abs().max().item()


def check(sharding_type: str, out_dir: Path, rank: int, world: int) -> dict:
    tables = tables_for(sharding_type)
    table_names = [t["name"] for t in tables]
    # A different seed on each rank: the sharded model must still be rank 0's model everywhere (DDP
    # broadcasts dense parameters, maybe_shard_model the tables), so the reference is rank 0's model.
    torch.manual_seed(1000 + rank)
    ranker = RecapRanker(tiny_model_config(tables), NUM_CONTINUOUS, NUM_BINARY)
    model = ModelAndLoss(ranker, build_multi_task_loss(TASKS, pos_weights=[1.0, 3.0]))
    reference = copy.deepcopy(model)
    rank0_state = [reference.state_dict()]
    dist.broadcast_object_list(rank0_state, src=0)
    reference.load_state_dict(rank0_state[0])
    result_seed_differs = any(
        not torch.equal(a, b) for a, b in zip(reference.parameters(), model.parameters(), strict=True)
    )
    # As the trainer does: the sparse optimizer runs inside backward (fused into the sharded tables).
    apply_optimizer_in_backward(torch.optim.SGD, ranker.embedding_bag_collection.parameters(), {"lr": LR})
    ref_tables = {t: w.detach().clone() for _, t, w in embedding_weights(reference)}  # before any step

    sharded = maybe_shard_model(
        model, torch.device("cpu"), sharding_constraints={t: [sharding_type] for t in table_names}
    )
    result: dict = {"is_same_object": sharded is model, "rank_model_differs": result_seed_differs}
    plan = sharded.plan.plan[EBC]
    result["plan"] = {
        t: {"sharding_type": p.sharding_type, "ranks": sorted(set(p.ranks or []))} for t, p in plan.items()
    }

    # --- gather of the initial tables: every rank calls, rank 0 gets the full table.
    case_dir = out_dir / sharding_type
    # Alternate URL styles: file:// for some types, a plain path for the others.
    if sharding_type in ("table_wise", "row_wise"):
        url = f"file://{case_dir}/tables"
    else:
        url = str(case_dir / "plain")
    result["output_url"] = url
    gathered = {}
    for weight_name, table, tensor in embedding_weights(sharded):
        full = log_sharded_tensor_content(weight_name, table, tensor, output_url=url)
        gathered[table] = full
    result["gathered_tables"] = sorted(gathered)
    result["gathered_is_none"] = {t: g is None for t, g in gathered.items()}
    if rank == 0:
        result["initial_table_diff"] = {t: max_diff(gathered[t], ref_tables[t]) for t in table_names}
        case_dir.mkdir(parents=True, exist_ok=True)
        torch.save(ref_tables, case_dir / "reference_tables.pt")

    # --- forward on this rank's half vs the reference on the same half.
    examples = make_examples(GLOBAL_BATCH, tables, seed=1)
    per_rank = GLOBAL_BATCH // world
    halves = [range(r * per_rank, (r + 1) * per_rank) for r in range(world)]
    sharded.train()
    reference.train()
    loss, outputs = sharded(examples.batch(halves[rank]))
    ref_results = [reference(examples.batch(h)) for h in halves]
    ref_loss, ref_outputs = ref_results[rank]
    result["loss"] = loss.item()
    result["ref_loss"] = ref_loss.item()
    result["forward_diff"] = {
        k: max_diff(outputs[k], ref_outputs[k])
        for k in ("logits", "probabilities", "calibrated_probabilities", "loss", "labels", "weights")
    }
    result["forward_diff"].update(
        {k: max_diff(outputs[k], ref_outputs[k]) for k in ref_outputs if k.startswith("loss/")}
    )

    # --- backward: DDP-style mean over ranks == gradient of the mean of the half-batch losses.
    loss.backward()
    torch.stack([r[0] for r in ref_results]).mean().backward()
    ref_params = dict(reference.named_parameters())
    dense = dict(in_backward_optimizer_filter(sharded.named_parameters()))
    result["dense_param_names"] = sorted(dense)
    grad_diff = {}
    for name, p in dense.items():
        if p.grad is None or ref_params[name].grad is None:
            grad_diff[name] = None if (p.grad is None) == (ref_params[name].grad is None) else float("inf")
        else:
            grad_diff[name] = max_diff(p.grad, ref_params[name].grad)
    result["grad_diff"] = grad_diff
    result["max_grad"] = max(
        (p.grad.abs().max().item() for p in ref_params.values() if p.grad is not None), default=0.0
    )

    # --- one SGD step: dense optimizer on the sharded model (its tables stepped during backward);
    # plain SGD on every reference parameter, tables included.
    torch.optim.SGD(list(dense.values()), lr=LR).step()
    torch.optim.SGD(list(ref_params.values()), lr=LR).step()
    result["param_diff_after_step"] = max(max_diff(p, ref_params[n]) for n, p in dense.items())
    after = {}
    for weight_name, table, tensor in embedding_weights(sharded):
        after[table] = log_sharded_tensor_content(weight_name, table, tensor)
    if rank == 0:
        ref_after = {t: w for _, t, w in embedding_weights(reference)}
        result["table_diff_after_step"] = {t: max_diff(after[t], ref_after[t]) for t in table_names}
        result["table_change"] = {t: max_diff(ref_after[t], ref_tables[t]) for t in table_names}
    return result


def main() -> None:
    out_dir = Path(sys.argv[1])
    types = sys.argv[2:] or ["table_wise", "column_wise", "data_parallel", "row_wise"]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = {"world_size": world, "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"]), "cases": {}}
    for sharding_type in types:
        results["cases"][sharding_type] = check(sharding_type, out_dir, rank, world)
        dist.barrier()
    # torchrec's default sharder has no row_wise on CPU: planning fails, and must fail on every rank.
    ranker = RecapRanker(tiny_model_config(tables_for("row_wise")), NUM_CONTINUOUS, NUM_BINARY)
    try:
        maybe_shard_model(
            ModelAndLoss(ranker, build_multi_task_loss(TASKS)),
            torch.device("cpu"),
            sharding_constraints={"t0": ["row_wise"]},
            use_row_wise_cpu_sharder=False,
        )
        results["plan_error"] = None
    except Exception as e:
        results["plan_error"] = f"{type(e).__name__}: {e}"
    dist.barrier()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
