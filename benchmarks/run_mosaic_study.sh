#!/usr/bin/env bash
# The mosaic study's searches, one after the other (docs/method.md; benchmarks/results/mosaic_study/).
# Usage: COMOD_HOME=/path/to/runs benchmarks/run_mosaic_study.sh [shared new_tasks paper shared_heads]
# A search that was cut off continues: `comod search run --name N --or-resume` resumes it.
set -euo pipefail
cd "$(dirname "$0")/.."
COMOD=${COMOD:-.venv/bin/comod}
for arm in "${@:-shared new_tasks paper shared_heads}"; do
  for a in $arm; do
    echo "== $a: $(date -u +%H:%M:%S)"
    "$COMOD" search run "search_spaces/mosaic_study/$a.yaml" --name "mosaic_$a" --or-resume
    echo "== $a done: $(date -u +%H:%M:%S)"
  done
done
