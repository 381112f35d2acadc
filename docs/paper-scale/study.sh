#!/usr/bin/env bash
# The paper-scale editing study (issue 27): single counterfactual edits from order I at
# d = 1..4 and corrective edits, 16 each, on a trained 2,048-entity run, one editor per sweep.
#   docs/paper-scale/study.sh RUN_DIR OUT [THREADS]
# RUN_DIR is a finished `kgshatter train` run of the shape below; the SETS must be the run's
# own config (reproduce checks it and reuses the run). Each sweep writes OUT/<name>/ with
# table.csv, summary.json, report.md and the figures.
set -euo pipefail
RUN=$1; OUT=$2; THREADS=${3:-1}
SHAPE=(--set kg.n_entities=2048 --set model.d_model=24 --set model.n_heads=12 --set model.d_mlp=96)
SETS=("${SHAPE[@]}" ${EXTRA_SETS:-})
sweep() {  # name methods editor-preset (a sweep whose OUT/<name> is complete is reused)
  local name=$1 method=$2 preset=$3
  mkdir -p "$OUT/$name"
  [ -d "$OUT/$name/run" ] || cp -r "$RUN" "$OUT/$name/run"
  kgshatter reproduce --preset cpu "${SETS[@]}" --out "$OUT/$name" --methods "$method" \
    --editor-preset "$preset" --n 16 --sequential 0 --max-queries 300 --threads "$THREADS" --quiet
}
sweep memit-relative memit synthetic-relative
sweep rome-block1-relative rome synthetic-relative-block1
sweep rome-block0-relative rome synthetic-relative
sweep alphaedit-pmet-relative alphaedit,pmet synthetic-relative
