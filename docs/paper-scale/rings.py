"""Which read-out draws the ring a 2,048-entity model holds? (issue 27, item 5)

    python docs/paper-scale/rings.py RUN_DIR OUT.json

For every order, at every site (embedding, each block's MLP output and residual stream; the
representation of entity x is the state at the relation token of the query "x o_C1", averaged
over 5 random-walk prefixes, as the evaluation reads it): the neighbour agreement, the Fourier
probe spectrum (R^2 onto cos/sin of k * position, k = 1..8), and the circular alignment of 2-D
embeddings: Isomap with 2, 3 (the study's default), 10 and 30 neighbours, and PCA; and the
power spectrum of the representation along the ring (its six strongest frequencies). Numbers
only; the figure is drawn by `kgshatter evaluate RUN --figure`.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from kgshatter.analysis.geometry import (
    circular_alignment,
    embed_2d,
    fourier_probe,
    neighbour_fraction,
    one_blas_thread,
)
from kgshatter.analysis.representations import collect_representations
from kgshatter.evaluate import Evaluator
from kgshatter.sites import all_sites
from kgshatter.training import load_run

torch.set_num_threads(1)
run, graph, model, state = load_run(sys.argv[1])
evaluator = Evaluator.for_run(run, graph)
sites = all_sites(model.cfg.n_layers, ("mlp_out", "resid_post"))
n = graph.n_entities
result: dict = {"step": state["step"], "orders": {}}
for o in range(graph.n_orders):
    reps = collect_representations(model, evaluator.ring_tokens(o), sites, batch_size=1024)
    positions = graph.positions[o]
    name = graph.order_name(o)
    result["orders"][name] = {}
    for site, r in reps.items():
        with one_blas_thread():
            # power spectrum over the ring: the representation as a function of ring position,
            # Fourier-transformed along the ring, power summed over dimensions
            x = r.numpy()[graph.rings[o]]
            power = np.abs(np.fft.rfft(x - x.mean(0), axis=0)) ** 2
            total = power.sum(1)[1:]
            top = np.argsort(total)[::-1][:6] + 1
            row = {
                "top_frequencies": {int(k): float(total[k - 1] / total.sum()) for k in top},
                "neighbours": neighbour_fraction(r, positions, n),
                "fourier_r2": fourier_probe(r, positions, n),
                "pca": circular_alignment(embed_2d(r, "pca"), positions, n),
            }
            for k in (2, 3, 10, 30):
                row[f"isomap_{k}"] = circular_alignment(embed_2d(r, "isomap", k), positions, n)
        result["orders"][name][str(site)] = row
        print(
            name,
            site,
            {
                k: (round(v, 3) if isinstance(v, float) else {f: round(x, 2) for f, x in v.items()})
                for k, v in row.items()
            },
            flush=True,
        )
with open(sys.argv[2], "w") as f:
    json.dump(result, f, indent=1)
