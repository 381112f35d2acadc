"""How far apart along the ring are the values an edit writes? (issue 27, "the paper's size
of effect")

    python docs/paper-scale/value_distance.py RUN_DIR [RUN_DIR ...] > out.json

A counterfactual edit at distance d asks subject x for the answer of the entity d places along
the ring. The edits measured in ``editor_ratio.py`` are 1.5-2.2 times the gap between the two
entities' values at every d, though mostly not in its direction, so the size of the edit
follows D(d) = mean over x of ||v(x + d) - v(x)||, where v(x) is a site's output at the
relation token of the query ``x o_C1`` (averaged over the evaluation's random-walk prefixes, as
``kgshatter evaluate`` reads the rings) and x + d is the entity d places clockwise on the same
order's ring. On a ring drawn once around (frequency 1) D grows with d up to the far side;
on a ring wound many times around D saturates within a few places, and a d = 4 edit is hardly
larger than a d = 1 edit. Per run, order and site: D(d) / D(1) for d = 2..8, 16, ..., 1024,
and D(1) / D(far), D(far) the mean distance between entities N / 4 or more places apart
(``kgshatter.analysis.geometry.ring_step_distances`` and ``ring_far_distance``).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from kgshatter.analysis.geometry import ring_far_distance, ring_step_distances
from kgshatter.analysis.representations import collect_representations
from kgshatter.evaluate import Evaluator
from kgshatter.sites import Site
from kgshatter.training import load_run

STEPS = (1, 2, 3, 4, 5, 6, 8, 16, 32, 64, 128, 256, 512, 1024)
SITES = (Site(0, "mlp_out"), Site(1, "mlp_out"), Site(0, "resid_post"))
torch.set_num_threads(1)


def profile(reps: torch.Tensor, positions: np.ndarray, n: int) -> dict[str, float]:
    """D(d) / D(1) along the ring, and D(1) / D(far)."""
    dist = ring_step_distances(reps, positions, n, STEPS)
    far = ring_far_distance(reps, positions, n)
    out = {f"D({d})/D(1)": round(dist[d] / dist[1], 3) for d in STEPS[1:]}
    return {"D(1)": round(dist[1], 5), "D(1)/D(far)": round(dist[1] / far, 3)} | out


result: dict = {}
for run_dir in sys.argv[1:]:
    run, graph, model, state = load_run(run_dir)
    evaluator = Evaluator.for_run(run, graph)
    result[run_dir] = {"step": state["step"], "orders": {}}
    for o in range(graph.n_orders):
        reps = collect_representations(model, evaluator.ring_tokens(o), SITES, batch_size=1024)
        result[run_dir]["orders"][graph.order_name(o)] = {
            str(s): profile(r, graph.positions[o], graph.n_entities) for s, r in reps.items()
        }
    print(run_dir, json.dumps(result[run_dir]["orders"]["I"]), file=sys.stderr, flush=True)
print(json.dumps(result, indent=1))
