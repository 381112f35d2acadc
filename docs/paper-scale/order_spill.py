"""Where a ROME edit at block 0 (relation token) lands, by order (issue 27: "why order III").

    python docs/paper-scale/order_spill.py SWEEP_RUN_DIR [STEP] > spill.json

SWEEP_RUN_DIR is a sweep's copy of the paper run (``OUT/run`` of ``kgshatter reproduce``), whose
``cache/`` holds the second moment C of block 0's MLP keys (computed, about a minute, if not).
A rank-one edit with key k* changes the MLP output of a query with key k by
(C^-1 k*) . k / (k* . C^-1 k*) times the edited query's change, so the mean |overlap| over
every entity's queries of the relations of an order says how much of the edit reaches that
order. Printed for the sweep's requests (16 per distance, request seeds 0-2, d = 1 and 4),
with the cosine between the relations' mean keys; then the same for requests from every order
in turn (``overlap_by_edited_order``: edited order -> overlap per order; ``mean_key_cosine``:
order -> cosine with each order), which says which pairs of orders share block 0's keys.
STEP reads the checkpoint written at that step instead of the newest (a learning curve kept
with ``train.keep_checkpoints``).
"""

import json
import sys
from pathlib import Path

import torch

from kgshatter.analysis.spill import mean_key_cosine, order_overlap, relation_keys
from kgshatter.editing import CovarianceCache
from kgshatter.editing.core import synthetic_stats
from kgshatter.editing.protocols import sample_requests
from kgshatter.kg.walks import WalkSampler
from kgshatter.training import load_run

torch.set_num_threads(1)
run_dir = Path(sys.argv[1])
run, graph, model, state = load_run(run_dir, step=int(sys.argv[2]) if len(sys.argv) > 2 else None)
sampler = WalkSampler(graph, run.walks)
# C from 10^5 validation walks, as the sweep's ROME used it (read from the cache when there)
stats = synthetic_stats(model, sampler, 0, 100_000, CovarianceCache(run_dir / "cache"))
V, lam = stats.eigenvectors.double(), stats.eigenvalues.double()
C_inv = V @ torch.diag(1 / (lam + 1e-6 * lam.max())) @ V.T
keys = relation_keys(model, sampler, 0)  # [relation, entity, d_mlp] at the relation token
out: dict = {"step": state["step"], "overlap": {}, "mean_key_cosine_with_order_I": {}}
for seed in (0, 1, 2):
    for d in (1, 4):
        reqs = sample_requests(graph, "counterfactual", 16, seed * 1000 + d, distance=d)
        per = [order_overlap(keys, graph, q.subject, q.relation, C_inv) for q in reqs]
        out["overlap"][f"seed {seed}, d={d}"] = {
            o: round(sum(p[o] for p in per) / len(per), 4) for o in per[0]
        }
cosine = mean_key_cosine(keys, graph, 0)
out["mean_key_cosine_with_order_I"] = {o: round(v, 3) for o, v in cosine.items()}
# every order edited in turn (the same request seeds and distances): which orders share keys
out["overlap_by_edited_order"], out["mean_key_cosine"] = {}, {}
for o in range(graph.n_orders):
    per = [
        order_overlap(keys, graph, q.subject, q.relation, C_inv)
        for seed in (0, 1, 2)
        for d in (1, 4)
        for q in sample_requests(graph, "counterfactual", 16, seed * 1000 + d, distance=d, order=o)
    ]
    name = graph.order_name(o)
    out["overlap_by_edited_order"][name] = {
        k: round(sum(p[k] for p in per) / len(per), 4) for k in per[0]
    }
    out["mean_key_cosine"][name] = {
        k: round(v, 3) for k, v in mean_key_cosine(keys, graph, o).items()
    }
print(json.dumps(out, indent=1))
