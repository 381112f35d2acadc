"""Does the editor set how much larger a far edit is than a near one? (issue 27, "the paper's
size of effect")

    python docs/paper-scale/editor_ratio.py SWEEP_RUN_DIR [EDITS_PER_D] > out.json

The same requests as ``edit_size.py`` (EDITS_PER_D, default 8, single counterfactual edits of
order I facts at d = 1 and d = 4, request seeds 1001 and 1004), edited by ROME at block 0 with
the ``synthetic-relative`` preset and with one of its target-optimisation settings changed at a
time (``VARIANTS``: Adam's step, the weight decay, both). Per variant and d: the value shift
``||v* - v||`` and the weight delta's norm (means over the edits), the Adam steps taken, the
final NLL of the new target (the optimisation stops below 0.05), the share of edits whose
final NLL is below ln 2 (the new target more likely than not), and the direct accuracy change
over the run's 2,000 direct queries (all orders and per order). And whether the edit writes
the value the model already writes for the entity d places along: per edit, the change ``b``
the edit writes at its key against the gap ``g = v(x') - v(x)`` between the subject x and the
entity x' whose answer is the new target, at the edited block's MLP output and residual stream
(relation token, the five evaluation prefixes): ``||b|| / ||g||``, cos(b, g) and |cos(b, g)|
(two random directions in d_model 24 have a mean |cos| of 0.16). SWEEP_RUN_DIR as in
``edit_size.py`` (its ``cache/`` holds the key statistics; computed if absent).
"""

import json
import math
import sys

import numpy as np
import torch
from direct_queries import DirectQueries

import kgshatter as ks
from kgshatter.analysis.representations import collect_representations, entity_query_tokens
from kgshatter.editing.core import AlreadyAnswered
from kgshatter.sites import Site

# one lever at a time against the preset (relative=True, lr=0.05, weight_decay=0.5, steps=200)
VARIANTS = {
    "preset": {},
    "lr 0.01": {"lr": 0.01, "steps": 1000},
    "lr 0.5": {"lr": 0.5},
    "weight_decay 0": {"weight_decay": 0.0},
    "lr 0.5, weight_decay 0": {"lr": 0.5, "weight_decay": 0.0},
}
torch.set_num_threads(1)
run_dir = sys.argv[1]
per_d = int(sys.argv[2]) if len(sys.argv) > 2 else 8
dq = DirectQueries.load(run_dir)
graph, model, sampler = dq.graph, dq.model, dq.sampler


def value_gap(request, edit) -> dict[str, float]:
    """For the edit's written change b and the gap g at the edited block's MLP output and
    residual stream: ||b|| / ||g||, cos(b, g)."""
    layer = edit.deltas[0].layer
    other = int(np.flatnonzero(graph.table[request.relation] == request.target)[0])
    tokens = entity_query_tokens(sampler, request.relation, 5)[[request.subject, other]]
    sites = [Site(layer, "mlp_out"), Site(layer, "resid_post")]
    v = collect_representations(model, tokens, sites)
    b = edit.deltas[0].b[:, 0].double()
    out = {}
    for site in sites:
        g = (v[site][1] - v[site][0]).double()
        out[f"b/g {site.component}"] = float(b.norm() / g.norm())
        out[f"cos {site.component}"] = float(b @ g / (b.norm() * g.norm()))
    return out


was_right = dq.predictions() == dq.answers
rome = ks.get_method("rome")
task = ks.SyntheticTask(sampler, ks.CovarianceCache(f"{run_dir}/cache"))
requests = {
    d: ks.sample_requests(graph, "counterfactual", per_d, 1000 + d, distance=d) for d in (1, 4)
}
out: dict = {"run": run_dir, "accuracy_before": float(was_right.mean()), "variants": {}}
for name, overrides in VARIANTS.items():
    config = rome.config("synthetic-relative", n_samples=100_000, **overrides)
    out["variants"][name] = {"overrides": overrides}
    for d, reqs in requests.items():
        rows = []
        for request in reqs:
            try:
                edit = rome.compute(model, task, request, config)
            except AlreadyAnswered:  # the model already gives this target: skipped
                continue
            with ks.edited(model, edit):
                after = dq.predictions()
            rows.append(
                {
                    "shift": edit.info["delta_norm"],
                    "norm": float(sum(torch.linalg.matrix_norm(x.dense) for x in edit.deltas)),
                    "steps": len(edit.info["losses"]),
                    "nll": edit.info["final_nll"],
                    "gap": value_gap(request, edit),
                    "change": dq.change_points(after, was_right),
                }
            )
        out["variants"][name][f"d={d}"] = {
            "n_edits": len(rows),
            "shift": round(float(np.mean([r["shift"] for r in rows])), 5),
            "norm": round(float(np.mean([r["norm"] for r in rows])), 4),
            "steps": round(float(np.mean([r["steps"] for r in rows])), 1),
            "final_nll": round(float(np.mean([r["nll"] for r in rows])), 3),
            "taken": round(float(np.mean([r["nll"] < math.log(2) for r in rows])), 3),
            "value_gap": {
                k: round(float(np.mean([r["gap"][k] for r in rows])), 3) for k in rows[0]["gap"]
            }
            | {
                f"|{k}|": round(float(np.mean([abs(r["gap"][k]) for r in rows])), 3)
                for k in rows[0]["gap"]
                if k.startswith("cos")
            },
            "direct_change_points": {
                k: round(float(np.mean([r["change"][k] for r in rows])), 2)
                for k in rows[0]["change"]
            },
        }
    v = out["variants"][name]
    v["norm_ratio"] = round(v["d=4"]["norm"] / v["d=1"]["norm"], 2)
    print(name, json.dumps(v), file=sys.stderr, flush=True)
print(json.dumps(out, indent=1))
