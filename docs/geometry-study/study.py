"""The geometry study's tables and figures from its reproductions (docs/geometries.md).

The cpu regime (presets of 64 entities, the cpu recipe for 6000 steps):

    for g in ring64 torus grid mixed tree ring-tree; do
      kgshatter reproduce --preset $g --out runs/geo-$g --methods rome,memit \
        --distances 1,2,3,4,6,8 --sequential 0 --seeds 0,1     # tree: 1,2,3,4,5,6
    done
    python docs/geometry-study/study.py runs/geo-ring64 runs/geo-torus runs/geo-grid \
        runs/geo-mixed runs/geo-tree runs/geo-ring-tree

The fidelity study's regime (the compressed recipe at N = 64, hops 1-2, 20k steps):

    base="--preset compressed --from-scratch --set kg.n_entities=64 --set kg.max_hops=2"
    kgshatter reproduce $base --out runs/geo-c-ring64 ...          # the same sweep flags
    kgshatter reproduce $base --set kg.structure=tree --set kg.branching=3 --out runs/geo-c-tree ...
    kgshatter reproduce $base --set kg.structure=grid --set kg.width=8 --out runs/geo-c-grid ...
    python docs/geometry-study/study.py --name study-compressed ring64=runs/geo-c-ring64 \
        tree=runs/geo-c-tree grid=runs/geo-c-grid

writes ``NAME.json`` and ``NAME.png`` (``--name``, default ``study``) next to this file and
prints the table. An argument is a reproduction's folder, or ``LABEL=FOLDER`` to name its
column (default: its preset). Per geometry, method and edit distance d: the accuracy drop
(points, mean of direct / logical / compositional) of every order and R(D*) x100 of every
order, from each reproduction's ``summary.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

SPLITS = ("direct", "logical", "compositional")


def load(folder: Path) -> dict:
    s = json.loads((folder / "summary.json").read_text())
    preset = json.loads((folder / "run" / "run.json").read_text())["config"]["name"]
    out: dict = {"preset": preset, "site": s["site"], "baseline": s["baseline"], "methods": {}}
    for method, v in s["methods"].items():
        rows = {}
        for e in v["by_kind"].values():
            if e["distance"] is None:
                continue
            acc = e["accuracy_change_points"]
            drop = {
                o: -statistics.fmean(acc[sp][o] for sp in SPLITS if acc[sp][o] is not None)
                for o in acc["direct"]
            }
            rows[e["distance"]] = {"n": e["n"], "efficacy": e["efficacy"], "drop": drop,
                                   "R_x100": e["R_x100"], "isomap_after": e["isomap"]}  # fmt: skip
        out["methods"][method] = {
            "by_distance": dict(sorted(rows.items())),
            "fit_drop_on_R": v["fit_drop_on_R"],
        }
    return out


def main(folders: list[str], name: str = "study") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = {}
    for arg in folders:  # FOLDER, or LABEL=FOLDER (the label replaces the preset's name)
        label, _, folder = arg.rpartition("=")
        entry = load(Path(folder))
        study[label or entry["preset"]] = entry
    here = Path(__file__).parent
    (here / f"{name}.json").write_text(json.dumps(study, indent=1) + "\n")
    orders = ("I", "II", "III")
    fig, axes = plt.subplots(2, len(study), figsize=(4.2 * len(study), 7), squeeze=False)
    for col, (label, entry) in enumerate(study.items()):
        rome = entry["methods"]["rome"]["by_distance"]
        ds = list(rome)
        for o, style in zip(orders, ("o-", "s--", "^:"), strict=True):
            axes[0, col].plot(ds, [rome[d]["drop"][o] for d in ds], style, label=f"order {o}")
            axes[1, col].plot(ds, [rome[d]["R_x100"][o] for d in ds], style, label=f"order {o}")
        axes[0, col].set_title(f"{label}: ROME", fontsize=10)
        axes[0, col].set_ylabel("accuracy drop (points)")
        axes[1, col].set_ylabel("R(D*) x100")
        axes[1, col].set_xlabel("edit distance d")
        for ax in axes[:, col]:
            ax.set_xticks(ds)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(here / f"{name}.png", dpi=110)
    for label, entry in study.items():
        print(f"\n{label} (preset {entry['preset']}), representations at {entry['site']}")
        for method, m in entry["methods"].items():
            fit = m["fit_drop_on_R"]
            print(f"  {method}: r^2 of drop on R {fit['r2']:.2f} over {fit['n']} edits")
            for d, r in m["by_distance"].items():
                drop = " ".join(f"{o} {r['drop'][o]:5.1f}" for o in orders)
                big_r = " ".join(f"{o} {r['R_x100'][o]:5.1f}" for o in orders)
                print(f"    d={d}: efficacy {r['efficacy']:.2f} | drop {drop} | R {big_r}")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--name"]:
        main(args[2:], args[1])
    else:
        main(args)
