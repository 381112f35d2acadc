"""Per-distance means and the r^2 of the direct drop on R over several sweeps' single edits.

python docs/paper-scale/pool.py SITE SWEEP_DIR [SWEEP_DIR ...]
"""

import csv
import statistics
import sys
from pathlib import Path

site = sys.argv[1]
rows = []
for d in sys.argv[2:]:
    rows += [
        r
        for r in csv.DictReader(open(Path(d) / "table.csv"))
        if r["protocol"] == "single" and r.get("efficacy") and not r.get("skipped")
    ]
by: dict[str, list[dict[str, str]]] = {}
for r in rows:
    by.setdefault(r["kind"][:4] + r["sweep_distance"], []).append(r)
for k, rs in sorted(by.items()):
    acc = statistics.mean(100 * float(r["acc.direct.all"]) for r in rs)
    R = {
        o: round(statistics.mean(100 * float(r[f"R.{o}@{site}"]) for r in rs), 1)
        for o in ("I", "II", "III")
    }
    print(k, len(rs), f"direct {acc:.1f}", R)
x = [statistics.mean(float(r[f"R.{o}@{site}"]) for o in ("I", "II", "III")) for r in rows]
y = [-float(r["acc.direct.all"]) for r in rows]
print("r2 pooled", round(statistics.correlation(x, y) ** 2, 3), len(rows))
