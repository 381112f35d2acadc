"""Per-order learning curves of runs side by side: are the orders learned in lockstep?

    python docs/paper-scale/order_curves.py RUN_OR_HISTORY [...] [--split logical]

Prints, for each run (a run folder, finished or still training, or its ``history.json``),
direct accuracy (or the split named) per order at every evaluation, and the spread between the
best- and worst-learned order: on the paper-scale models, is an early spread a sign of orders
kept apart in block 0's key space, whose edits stay in the edited order
(docs/paper-scale/README.md, "Which training seeds shatter every order")?
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kgshatter.training import checkpoints

args = sys.argv[1:]
split = "direct"
if "--split" in args:
    i = args.index("--split")
    split = args[i + 1]
    del args[i : i + 2]
if not args:
    sys.exit(__doc__)
for arg in args:
    path = Path(arg)
    if path.is_dir() and not (path / "history.json").exists():  # still training
        path = checkpoints(path)[-1] / "state.json"
    elif path.is_dir():
        path = path / "history.json"
    record = json.loads(path.read_text())
    history = record["history"] if isinstance(record, dict) else record
    evals = [h for h in history if h.get("accuracy")]
    if not evals:
        print(f"== {arg}: no evaluation yet")
        continue
    orders = [o for o in evals[0]["accuracy"][split] if o != "all"]
    print(f"== {arg}: {split} accuracy (%) per order, and the spread (best - worst order)")
    print("step     " + "".join(f"{o:>7}" for o in orders) + "  spread")
    for h in evals:
        acc = [100 * h["accuracy"][split][o] for o in orders]
        cells = "".join(f"{a:7.1f}" for a in acc)
        print(f"{h['step']:<9}" + cells + f"{max(acc) - min(acc):8.1f}")
