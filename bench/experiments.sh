#!/usr/bin/env bash
# Every run behind EXPERIMENTS.md, in the order they are worth running. Each writes into
# docs/experiments/r2/<name>/ and is skipped when its results.json is already there with the same
# settings, so the script continues where an earlier session stopped: commit the JSON as each
# run finishes. Long: a default-size run takes about an hour on 2 idle cores.
#
#   BTM=target/release/btm-node bash bench/experiments.sh [name ...]   # default: all, in order
set -euo pipefail
cd "$(dirname "$0")/.."
BTM="${BTM:-target/release/btm-node}"
OUT=docs/experiments/r2
SEEDS="${SEEDS:-3}"

run() {
  local name="$1"; shift
  if [ "${#only[@]}" -gt 0 ] && [[ ! " ${only[*]} " =~ " ${name} " ]]; then return 0; fi
  echo "== ${name}: btm-node experiment --out $OUT/$name $*" >&2
  mkdir -p "$OUT/$name"
  # Progress goes to the log; the tables to the terminal.
  "$BTM" experiment --out "$OUT/$name" "$@" 2>"$OUT/$name/progress.log"
}

only=("$@")
# The paper's comparison under the released code's protocol, with every baseline.
run update-matched --seeds "$SEEDS"
# Round one's protocol (same FLOPs, 1/8 of the ELM updates, fresh optimiser), to measure the difference.
run full-batch --protocol full-batch --seeds "$SEEDS"
# The update-matched protocol with a fresh optimiser at the branch.
run update-matched-fresh --optimizer fresh --seeds "$SEEDS" --no-baselines
# Budget curve: does BTM's gap to dense close or grow with compute?
run budget-1200 --steps 1200 --seeds "$SEEDS" --no-baselines
run budget-4800 --steps 4800 --seeds "$SEEDS" --no-baselines
# Seed-share sweep at B = 2400.
run share-0.25 --seed-share 0.25 --seeds "$SEEDS" --no-baselines
run share-0.75 --seed-share 0.75 --seeds "$SEEDS" --no-baselines

# The plots of EXPERIMENTS.md, from whatever has finished.
plot() {
  local out="$1" x="$2"; shift 2
  local have=()
  for d in "$@"; do [ -e "$OUT/$d/results.json" ] || ls "$OUT/$d"/seed*/results.json >/dev/null 2>&1 && have+=("$OUT/$d"); done
  if [ "${#have[@]}" -ge 2 ]; then "$BTM" experiment-plot --x "$x" --out "$OUT/$out" "${have[@]}"; fi
}
plot budget.png flops budget-1200 update-matched budget-4800
plot seed-share.png seed-share share-0.25 update-matched share-0.75
