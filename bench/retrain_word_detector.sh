#!/bin/bash
# Retrain the word detector of a finished pipeline run with changed params, then smooth and rerank, in a folder
# beside it: the run's data, features and pools are linked, its neighbour_words and wordproto outputs copied.
# Used for the word-detector tries in BENCHMARKS.md (the run's own members are the base).
#
#   bench/retrain_word_detector.sh WORLD EXP "PYTHON EDIT OF p" [SEED]
#   bench/retrain_word_detector.sh /tmp/oc1 /tmp/exp/bag4 "p['train']['word_detector']['bag'] = 4"
#
# WORLD: a clone after `make repro` (or `dvc repro`); EXP: the folder to write (replaced); the edit is Python run on
# `p`, the world's params.yaml as a dict. SEED (default 1) is the word detector's seed; its outputs are renamed to
# seed 1 so that smooth and rerank read them as the run's member. Prints the member's and the re-ranker's NDCG@5.
# The code is this repository's src/ (SRC= to use another).
set -euo pipefail
[ $# -ge 3 ] || { sed -n 2,13p "$0"; exit 2; }
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORLD=$(cd "$1" && pwd); EXP=$2; EDIT=$3; SEED=${4:-1}; SRC=${SRC:-$HERE/src}
PY=$HERE/.venv/bin/python; M=$HERE/.venv/bin/mmrecall
rm -rf "$EXP"; mkdir -p "$EXP/outputs" "$EXP/models"; cd "$EXP"
for d in data features pools; do ln -s "$WORLD/$d" "$d"; done
cp -r "$WORLD/outputs/neighbour_words-seed1" "$WORLD/outputs/wordproto" outputs/
cp -r "$WORLD/models/neighbour_words" models/
cp "$WORLD/params.yaml" .
set_params() {  # $1: Python edit of p, $2: train.seeds
  "$PY" - "$1" "$2" <<'PY'
import sys, yaml
p = yaml.safe_load(open("params.yaml"))
exec(sys.argv[1])
p["train"]["seeds"] = [int(sys.argv[2])]
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
PY
}
set_params "$EDIT" "$SEED"
git init -q .
export PYTHONPATH=$SRC DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true
/usr/bin/time -f "train %e s, peak RSS %M KB" "$M" train --model word_detector --seed "$SEED" --no-progress > train.log 2>&1
if [ "$SEED" != 1 ]; then
  mv "outputs/word_detector-seed$SEED" outputs/word_detector-seed1
  mv "models/word_detector/seed$SEED" models/word_detector/seed1
  set_params "pass" 1
fi
"$M" smooth > smooth.log 2>&1
"$M" rerank > rerank.log 2>&1
"$PY" - <<'PY'
import glob, json
t = json.load(open(glob.glob("metrics/train/word_detector-seed*.json")[0]))
r = json.load(open("metrics/rerank.json"))["rerank"]["valid"]["ndcg_at_5"]
print(f"word_detector valid {t['valid']['ndcg_at_5']:.4f} (best step {t['best_step']} of {t['steps']}, "
      f"{t['train_seconds']} s); re-ranker valid out of fold {r:.4f}")
PY
