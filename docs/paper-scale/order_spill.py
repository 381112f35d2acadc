"""Where a ROME edit at block 0 (relation token) lands, by order (issue 27: "why order III").

    python docs/paper-scale/order_spill.py SWEEP_RUN_DIR > spill.json

SWEEP_RUN_DIR is a sweep's copy of the paper run (``OUT/run`` of ``kgshatter reproduce``), whose
``cache/`` holds the second moment C of block 0's MLP keys (computed, about a minute, if not).
A rank-one edit with key k* changes the MLP output of a query with key k by
(C^-1 k*) . k / (k* . C^-1 k*) times the edited query's change, so the mean |overlap| over
every entity's queries of the relations of an order says how much of the edit reaches that
order. Printed for the sweep's requests (16 per distance, request seeds 0-2, d = 1 and 4),
with the cosine between the relations' mean keys.
"""

import json
import sys
from pathlib import Path

import torch

from kgshatter.analysis.representations import collect_representations, entity_query_tokens
from kgshatter.editing import CovarianceCache
from kgshatter.editing.core import synthetic_stats
from kgshatter.editing.protocols import sample_requests
from kgshatter.kg.walks import WalkSampler
from kgshatter.sites import Site
from kgshatter.training import load_run

torch.set_num_threads(1)
run_dir = Path(sys.argv[1])
run, graph, model, _ = load_run(run_dir)
sampler = WalkSampler(graph, run.walks)
# C from 10^5 validation walks, as the sweep's ROME used it (read from the cache when there)
stats = synthetic_stats(model, sampler, 0, 100_000, CovarianceCache(run_dir / "cache"))
V, lam = stats.eigenvectors.double(), stats.eigenvalues.double()
C_inv = V @ torch.diag(1 / (lam + 1e-6 * lam.max())) @ V.T
site = Site(0, "mlp_post")
keys = {  # relation -> [entity, d_mlp], mean over 5 contexts, at the relation token
    r: collect_representations(model, entity_query_tokens(sampler, r, 5, seed=1), [site],
                               "relation")[site].double()
    for r in range(graph.n_relations)
}  # fmt: skip
orders = {o: [r for r in keys if graph.relation(r).order == o] for o in range(graph.n_orders)}
out: dict = {"overlap": {}, "mean_key_cosine_with_order_I": {}}
for seed in (0, 1, 2):
    for d in (1, 4):
        reqs = sample_requests(graph, "counterfactual", 16, seed * 1000 + d, distance=d)
        sums = {o: 0.0 for o in orders}
        for q in reqs:
            u = C_inv @ keys[q.relation][q.subject]
            own = float(keys[q.relation][q.subject] @ u)
            for o, rs in orders.items():
                sums[o] += sum(float((keys[r] @ u).abs().mean()) for r in rs) / len(rs) / own
        out["overlap"][f"seed {seed}, d={d}"] = {
            graph.order_name(o): round(v / len(reqs), 4) for o, v in sums.items()
        }
mean_key = {r: k.mean(0) for r, k in keys.items()}
for o, rs in orders.items():
    cos = [float(torch.cosine_similarity(mean_key[a], mean_key[b], dim=0))
           for a in orders[0] for b in rs if a != b]  # fmt: skip
    out["mean_key_cosine_with_order_I"][graph.order_name(o)] = round(sum(cos) / len(cos), 3)
print(json.dumps(out, indent=1))
