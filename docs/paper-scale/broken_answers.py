"""Where the answers an edit breaks go: the ring distance from each newly wrong answer to the
right one, and the pre-edit margin of the queries that break (issue 27, "the paper's size of
effect").

    python docs/paper-scale/broken_answers.py SWEEP_RUN_DIR [EDITS_PER_D] > broken.json

SWEEP_RUN_DIR is a sweep's copy of a paper-scale run (``OUT/run`` of ``kgshatter reproduce``,
whose ``cache/`` holds block 0's key statistics; computed, about a minute, if not). ROME with the
sweep's editor (``synthetic-relative``, block 0, C from 10^5 walks) makes EDITS_PER_D (default 6)
single counterfactual edits of order I facts at each d = 1..4 (request seeds 1001..1004); after
each, the run's direct-recall queries (2,000, five contexts each) are answered again. A query
"lost" was right before and is wrong after; its wrong answer's distance from the right one is
measured on the ring of the query's order. The margin is log p(right) - max log p(other entity)
before the edit.
"""

import collections
import json
import sys

import numpy as np
import torch
from direct_queries import DirectQueries

import kgshatter as ks

torch.set_num_threads(1)
run_dir = sys.argv[1]
per_d = int(sys.argv[2]) if len(sys.argv) > 2 else 6
dq = DirectQueries.load(run_dir)
graph, model, sampler, queries = dq.graph, dq.model, dq.sampler, dq.queries
answers, orders = dq.answers, dq.orders
rows = torch.arange(len(answers))


def answer(m):
    """Each query's predicted entity and its margin (log p(right) - max log p(other))."""
    logp = torch.log(dq.probs(m).clamp_min(1e-30))
    predicted = logp.argmax(-1).numpy()
    right = logp[rows, torch.from_numpy(answers)]
    logp[rows, torch.from_numpy(answers)] = -torch.inf
    return predicted, (right - logp.max(-1).values).numpy()


before, margin = answer(model)
was_right = before == answers
rome = ks.get_method("rome")
config = rome.config_with_samples("synthetic-relative", 100_000)
task = ks.SyntheticTask(sampler, ks.CovarianceCache(f"{run_dir}/cache"))
out = {
    "run": run_dir,
    "accuracy_before": round(float(was_right.mean()), 4),
    "margin_before_quartiles": np.quantile(margin[was_right], [0.25, 0.5, 0.75]).round(2).tolist(),
}
for d in (1, 2, 3, 4):
    distances, lost_by_order, lost_share, lost_margins = collections.Counter(), {}, [], []
    to_target = 0  # lost answers that are now the edit's new target
    other_order = 0  # far answers (> 8 places) within one place of another order's answer
    for request in ks.sample_requests(graph, "counterfactual", per_d, 1000 + d, distance=d):
        with ks.edited(model, rome.compute(model, task, request, config)):
            after, _ = answer(model)
        lost = np.nonzero(was_right & (after != answers))[0]
        lost_share.append(len(lost) / len(answers))
        lost_margins += margin[lost].tolist()
        to_target += int((after[lost] == int(request.target)).sum())
        for i in lost:
            o = int(orders[i])
            name = graph.order_name(o)
            lost_by_order[name] = lost_by_order.get(name, 0) + 1
            far = int(graph.distance(o, int(answers[i]), int(after[i])))
            distances[far] += 1
            subject = int(queries.rows[i, 0])
            other_order += far > 8 and any(
                graph.distance(r.order, graph.apply(r.index, subject), int(after[i])) <= 1
                for r in graph.relations
                if r.order != o
            )
    total = max(sum(distances.values()), 1)
    out[f"d={d}"] = {
        "lost_share": round(float(np.mean(lost_share)), 4),
        "lost_by_order": lost_by_order,
        "ring_distance_1": round(distances[1] / total, 3),
        "ring_distance_2": round(distances[2] / total, 3),
        "ring_distance_3_to_8": round(sum(distances[k] for k in range(3, 9)) / total, 3),
        "ring_distance_over_8": round(sum(v for k, v in distances.items() if k > 8) / total, 3),
        "now_the_new_target": round(to_target / total, 3),
        "far_near_another_orders_answer": round(other_order / total, 3),
        "margin_before_of_lost_median": round(float(np.median(lost_margins)), 2)
        if lost_margins
        else None,
    }
print(json.dumps(out, indent=1))
