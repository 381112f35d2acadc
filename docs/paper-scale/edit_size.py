"""Damage against an edit's size at fixed direction: ROME's relative edits at d = 1 and d = 4,
their weight delta scaled by c, and the direct recall lost (issue 27, "the paper's size of
effect").

    python docs/paper-scale/edit_size.py SWEEP_RUN_DIR [EDITS_PER_D [EDITOR_PRESET]] > out.json

SWEEP_RUN_DIR is a sweep's copy of a paper-scale run (``OUT/run`` of ``kgshatter reproduce``,
whose ``cache/`` holds the key statistics; computed, about a minute, if not). ROME with the
sweep's editor (EDITOR_PRESET, default ``synthetic-relative``: block 0) makes EDITS_PER_D
(default 8) single counterfactual edits of order I facts at d = 1 and at d = 4 (request seeds
1001 and 1004, as ``broken_answers.py``); each edit's rank-one delta ``a b^T`` is applied scaled
by c in ``SCALES`` (c = 1: the edit itself), and the run's 2,000 direct queries (five contexts
each) are answered again (a request whose target the model already gives is skipped; ``n_edits``
counts the edits made). Per d and c: the delta's Frobenius norm and the direct accuracy change
in points, all orders and per order (the unscaled edits take: 100% efficacy in the sweeps). Same
d, different c isolates the size; same norm, different d isolates the direction.
"""

import dataclasses
import json
import sys

import numpy as np
import torch
from direct_queries import DirectQueries

import kgshatter as ks
from kgshatter.editing.core import AlreadyAnswered
from kgshatter.editing.edit import LayerDelta

SCALES = (0.5, 1.0, 2.0, 4.0, 8.0)
torch.set_num_threads(1)
run_dir = sys.argv[1]
per_d = int(sys.argv[2]) if len(sys.argv) > 2 else 8
preset = sys.argv[3] if len(sys.argv) > 3 else "synthetic-relative"
dq = DirectQueries.load(run_dir)
graph, model, sampler, answers = dq.graph, dq.model, dq.sampler, dq.answers


def scaled(edit, c):
    """The edit with every layer's delta multiplied by c."""
    deltas = [LayerDelta(d.layer, d.a * c, d.b) for d in edit.deltas]
    return dataclasses.replace(edit, deltas=deltas)


before = dq.predictions()
was_right = before == answers
rome = ks.get_method("rome")
config = rome.config_with_samples(preset, 100_000)
task = ks.SyntheticTask(sampler, ks.CovarianceCache(f"{run_dir}/cache"))
out = {
    "run": run_dir,
    "editor_preset": preset,
    "scales": list(SCALES),
    "accuracy_before": float(was_right.mean()),
}
for d in (1, 4):
    rows = []
    for request in ks.sample_requests(graph, "counterfactual", per_d, 1000 + d, distance=d):
        try:
            edit = rome.compute(model, task, request, config)
        except AlreadyAnswered:  # the model already gives this target (a wrong fact): skipped
            continue
        for c in SCALES:
            e = scaled(edit, c)
            with ks.edited(model, e):
                after = dq.predictions()
            rows.append(
                {
                    "c": c,
                    "norm": float(sum(torch.linalg.matrix_norm(x.dense) for x in e.deltas)),
                    "change": dq.change_points(after, was_right),
                }
            )
    out[f"d={d}"] = {
        "n_edits": len(rows) // len(SCALES),
    } | {
        str(c): {
            "norm": round(float(np.mean([r["norm"] for r in rows if r["c"] == c])), 4),
            "direct_change_points": {
                k: round(float(np.mean([r["change"][k] for r in rows if r["c"] == c])), 2)
                for k in rows[0]["change"]
            },
        }
        for c in SCALES
    }
print(json.dumps(out, indent=1))
