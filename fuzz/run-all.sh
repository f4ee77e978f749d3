#!/usr/bin/env bash
# The full fuzz runs the issue asks for: each target for 10 million executions or 2 core-hours,
# whichever comes first, one job each, into runs/<target> (scratch; the committed corpora are
# read, not written). Prints one line per target and appends it to runs/results.tsv:
#   target  executions  seconds  exec/s  crashes  cpu
#
#   ./run-all.sh                 # the light (burn-free) targets
#   ./run-all.sh --heavy         # the btm-net / btm-model targets in heavy/
#   ./run-all.sh decode_elm      # named targets (light or heavy)
# Needs cargo-fuzz (cargo install cargo-fuzz); RUSTC_BOOTSTRAP=1 lets it pass nightly flags on
# the stable toolchain. RUNS and SECS override the budget. SANITIZER (default none) is passed
# to cargo fuzz -s: the workspace forbids unsafe code, so AddressSanitizer would only watch
# the dependencies' unsafe code, at about a third of the speed (SANITIZER=address for that).
set -euo pipefail
cd "$(dirname "$0")"
RUNS="${RUNS:-10000000}"
SECS="${SECS:-7200}"
light=(decode_root decode_registry decode_seed decode_claim decode_elm decode_attestation decode_envelope accept_registry weights)
heavy=(addr_record record_key documents forest_manifest)
if [ "${1:-}" = "--heavy" ]; then targets=("${heavy[@]}"); elif [ $# -gt 0 ]; then targets=("$@"); else targets=("${light[@]}"); fi
[ -d corpus/decode_root ] || ./seed-corpus.sh
mkdir -p runs
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
for t in "${targets[@]}"; do
  dir=.; case " ${heavy[*]} " in *" $t "*) dir=heavy;; esac
  mkdir -p "runs/$t"
  log="runs/$t.log"
  start=$(date +%s.%N)
  set +e
  RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir "$dir" -O -s "${SANITIZER:-none}" "$t" "$PWD/runs/$t" "$PWD/corpus/$t" -- \
      -runs="$RUNS" -max_total_time="$SECS" -print_final_stats=1 > "$log" 2>&1
  rc=$?
  set -e
  end=$(date +%s.%N)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  [ -n "$secs" ] || secs=$(python3 -c "print(round($end-$start))")
  rate=$(python3 -c "print(round(${execs:-0}/max(${secs},1)))")
  crashes=$(ls "$dir/artifacts/$t" 2>/dev/null | wc -l)
  line=$(printf '%s\t%s\t%s\t%s\t%s\t%s\t%s' "$t" "${execs:-?}" "$secs" "$rate" "$crashes" "rc=$rc" "$cpu")
  echo "$line"
  echo "$line" >> runs/results.tsv
done
