"""Print a sweep's per-distance table (the rows of docs/paper-scale/README.md).

python docs/paper-scale/table.py OUT/NAME/summary.json [...]
"""

from __future__ import annotations

import json
import sys


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


for path in sys.argv[1:]:
    summary = json.loads(open(path).read())
    for method, m in summary["methods"].items():
        print(
            f"== {path}: {method}, r^2 of the direct drop on R: {fmt(m['fit_drop_on_R']['r2'], 2)}"
        )
        for label, k in sorted(m["by_kind"].items(), key=lambda kv: kv[1]["distance"] or 99):
            acc = k["accuracy_change_points"]["direct"]
            r = k["R_x100"]
            print(
                f"{label:>10}  n {k['n']:>2}  efficacy {fmt(100 * k['efficacy'], 0)}%  "
                f"direct all {fmt(acc['all'])}  I / II / III {fmt(acc['I'])} / {fmt(acc['II'])} / "
                f"{fmt(acc['III'])}  R x100 I / II / III {fmt(r['I'])} / {fmt(r['II'])} / "
                f"{fmt(r['III'])}  shift {fmt(k['mechanism'].get('shift.edited'), 3)}  spill "
                + " / ".join(fmt(k["mechanism"].get(f"spill.{o}"), 3) for o in ("I", "II", "III"))
                + "  "
                f"isomap I {fmt(k['isomap']['I'], 2)}"
            )
    # R per order at every site, and the r^2 of the direct drop on R there, from table.csv
    import csv
    import statistics
    from pathlib import Path

    table = [
        r
        for r in csv.DictReader(open(Path(path).with_name("table.csv")))
        if r["protocol"] == "single" and r.get("efficacy") and not r.get("skipped")
    ]
    sites = sorted({k.split("@")[1] for k in table[0] if k.startswith("R.I@")})
    for method in sorted({r["method"] for r in table}):
        rows = [r for r in table if r["method"] == method]
        for site in sites:
            by_d: dict[str, list[dict[str, str]]] = {}
            for r in rows:
                by_d.setdefault(r["kind"][:4] + r["sweep_distance"], []).append(r)
            line = []
            for label, rs in sorted(by_d.items()):
                mean = {
                    o: 100 * statistics.mean(float(r[f"R.{o}@{site}"]) for r in rs)
                    for o in ("I", "II", "III")
                }
                line.append(f"{label} {mean['I']:.1f}/{mean['II']:.1f}/{mean['III']:.1f}")
            x = [
                statistics.mean(float(r[f"R.{o}@{site}"]) for o in ("I", "II", "III")) for r in rows
            ]
            y = [-100 * float(r["acc.direct.all"]) for r in rows]
            r2 = statistics.correlation(x, y) ** 2 if len(set(x)) > 1 else float("nan")
            print(f"   {method} R x100 I/II/III at {site}: " + "; ".join(line) + f"; r^2 {r2:.2f}")
