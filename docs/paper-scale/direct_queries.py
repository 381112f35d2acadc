"""What the edit scripts of this folder share: a run and its 2,000 direct-recall queries (five
contexts each), answered again after each edit (``edit_size.py``, ``editor_ratio.py``,
``broken_answers.py``; imported from the script's own folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import kgshatter as ks
from kgshatter.evaluate import query_probs


@dataclass
class DirectQueries:
    """A run (``ks.load_run``), its walk sampler and its direct queries, with their answers and
    orders as arrays."""

    run: Any
    graph: Any
    model: Any
    sampler: Any
    queries: Any
    answers: np.ndarray
    orders: np.ndarray

    @classmethod
    def load(cls, run_dir: str) -> DirectQueries:
        run, graph, model, _ = ks.load_run(run_dir)
        queries = ks.Evaluator.for_run(run, graph).queries["direct"]
        return cls(
            run,
            graph,
            model,
            ks.WalkSampler(graph, run.walks),
            queries,
            queries.answers.numpy(),
            queries.order.numpy(),
        )

    def probs(self, model: Any = None) -> Any:
        """Each query's probabilities over the entities (the run's model by default)."""
        m = self.model if model is None else model
        return query_probs(m, self.queries)[:, : self.graph.n_entities]

    def predictions(self, model: Any = None) -> np.ndarray:
        """Each query's predicted entity."""
        return self.probs(model).argmax(-1).numpy()

    def change_points(self, after: np.ndarray, was_right: np.ndarray) -> dict[str, float]:
        """Direct accuracy after minus before, in points: all orders, then each order."""

        def change(keep: Any) -> float:
            right = after[keep] == self.answers[keep]
            return 100 * float(right.mean() - was_right[keep].mean())

        out = {"all": change(slice(None))}
        for o in range(self.graph.n_orders):
            out[self.graph.order_name(o)] = change(self.orders == o)
        return out
