"""One table over the SmolLM2 runs' summaries (the rows of docs/smollm2/README.md).

python docs/smollm2/table.py OUT/*/summary.json
"""

from __future__ import annotations

import json
import sys

for path in sys.argv[1:]:
    s = json.loads(open(path).read())
    fit = s["fit_accuracy_on_R"] or {}
    ab = s.get("ability_before") or {}
    print(
        f"== {s['config']['task']} / {s['config']['method']} ({s['preset']}): accuracy before "
        f"{100 * s['accuracy_before']:.1f}% ({s['known']}/{s['queries']} known), site {s['site']}, "
        f"perplexity {ab.get('perplexity', float('nan')):.2f}, calendar "
        f"{100 * ab.get('calendar', float('nan')):.0f}%, r2 {fit.get('r2', float('nan')):.2f}"
    )
    print("| d | n | success | paraphrase | neighbourhood change | accuracy change | R x100 | "
          "Isomap after | perplexity | calendar | fluency change |")  # fmt: skip
    for d, e in s["per_distance"].items():
        print(
            f"| {d} | {e['n']} | {100 * e['success']:.0f}% | {100 * e.get('paraphrase', 0):.0f}% "
            f"| {100 * e.get('neighbourhood_change', 0):+.1f} | {100 * e['accuracy_change']:+.1f} "
            f"| {100 * e['R']:.2f} | {e.get('isomap_after', float('nan')):.2f} | "
            f"{e.get('perplexity', float('nan')):.2f} | "
            f"{100 * e.get('calendar', float('nan')):.0f}% "
            f"| {e.get('fluency_change', float('nan')):+.2f} |"
        )
