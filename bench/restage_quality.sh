#!/bin/bash
# Re-run part of the pipeline on finished bench_quality.py worlds, with this repository's current commit.
#
#   bench/restage_quality.sh FROM_WORK TO_WORK "STAGES" WORLD...
#   bench/restage_quality.sh bench/work/quality-wd bench/work/quality-det \
#       "train@word_detector-1 evaluate smooth rerank register predict summary" hard near-miss looks
#
# For a change that leaves some members' code alone (those need no re-training): each world's clone under
# FROM_WORK is copied to TO_WORK (kept if it is there already), its src/, tests/, bench/, params.yaml and dvc.yaml
# are replaced by those of this repository's HEAD (nothing else: metrics/ and dvc.lock stay the world's), and each of STAGES
# runs with `dvc repro -s` in order. Then `bench/bench_quality.py --work TO_WORK --worlds WORLD...` reads the
# clones back into the grid table; its minutes column is still FROM_WORK's full run. A log per world in
# TO_WORK/<world>/restage.log. Not part of CI.
set -euo pipefail
if [ $# -lt 4 ]; then sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FROM=$(realpath "$1"); TO=$(realpath -m "$2"); STAGES=$3; shift 3
COMMIT=$(git -C "$ROOT" rev-parse HEAD)
mkdir -p "$TO"
for world in "$@"; do
  src="$FROM/$world"; dst="$TO/$world"
  [ -f "$src/metrics/predict.json" ] || { echo "[$world] $src: not a finished world"; exit 1; }
  [ -d "$dst" ] || cp -a "$src" "$dst"
  git -C "$dst" fetch -q "$ROOT" "$COMMIT"
  git -C "$dst" checkout -q FETCH_HEAD -- src tests bench params.yaml dvc.yaml
  export PATH="$ROOT/.venv/bin:$PATH" PYTHONPATH="$dst/src" DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true
  started=$(date +%s)
  for stage in $STAGES; do
    echo "[$world] dvc repro -s $stage"
    (cd "$dst" && dvc repro -s "$stage" >> restage.log 2>&1) || { echo "[$world] $stage failed: see $dst/restage.log"; exit 1; }
  done
  echo "[$world] done in $(( $(date +%s) - started )) s at ${COMMIT:0:7}"
done
