#!/usr/bin/env bash
# Training throughput of btm (burn) and the PyTorch reference, side by side in one run, on the
# same shapes and thread count. Prints a Markdown table with the ratio burn / torch.
#
#   bash bench/train_throughput.sh                # preset small, 2 threads
#   PRESET=tiny THREADS=2 bash bench/train_throughput.sh
#   BTM_X86V4=path BTM_NDARRAY=path bash bench/train_throughput.sh   # more burn CPU backends
#   EXTRA="label=path;label=path" bash bench/train_throughput.sh     # more binaries
#
# Needs: a release build of btm-node (BTM=path, default target/release/btm-node) and a Python with
# torch (PY=path; see BENCHMARKS.md). TORCH_GPT defaults to ../shared/bench/torch_gpt.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-small}
THREADS=${THREADS:-2}
BATCH=${BATCH:-8}
STEPS=${STEPS:-12}
BTM=${BTM:-target/release/btm-node}
# A binary built with `--features x86-v4` (gemm's AVX-512 kernels, chosen at run time).
BTM_X86V4=${BTM_X86V4:-}
# More binaries, each "label=path", separated by semicolons, e.g. builds of other profiles.
EXTRA=${EXTRA:-}
# A binary built with `--features ndarray` also measures burn's deprecated ndarray backend.
BTM_NDARRAY=${BTM_NDARRAY:-}
PY=${PY:-python3}
TORCH_GPT=${TORCH_GPT:-../shared/bench/torch_gpt.py}

case $PRESET in
  tiny)  shape="--layers 3 --d-model 96 --heads 4 --ctx 128 --vocab 2048" ;;
  small) shape="--layers 4 --d-model 256 --heads 4 --ctx 256 --vocab 4096" ;;
  gpt2-small) shape="--layers 12 --d-model 768 --heads 12 --ctx 1024 --vocab 50257" ;;
  *) echo "unknown preset $PRESET" >&2; exit 2 ;;
esac

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores visible, threads used: $THREADS"
echo "shapes: preset $PRESET ($shape --batch $BATCH), $STEPS timed steps after 2 warm-up"
rows=()
run_btm() {  # label binary [device]
  local out
  out=$(RAYON_NUM_THREADS=$THREADS "$2" bench --preset "$PRESET" --batch "$BATCH" --steps "$STEPS" --warmup 2 --matmul 2048 --device "${3:-cpu}")
  echo "$out" | grep -E '^(MATMUL|RESULT|KERNELS)' >&2
  local tps gf peak kernels
  kernels=$(echo "$out" | sed -n 's/^KERNELS //p')
  tps=$(echo "$out" | sed -n 's/^RESULT.*tokens_per_s=\([0-9.]*\).*/\1/p')
  gf=$(echo "$out" | sed -n 's/^RESULT.*gflops=\([0-9.]*\).*/\1/p')
  peak=$(echo "$out" | sed -n 's/^MATMUL.*gflops=\([0-9.]*\).*/\1/p')
  rows+=("$1${kernels:+ ($kernels)}|$tps|$gf|$peak")
}
run_btm "burn flex" "$BTM"
if [ -n "$BTM_X86V4" ]; then run_btm "burn flex + x86-v4" "$BTM_X86V4"; fi
IFS=';' read -ra extras <<<"$EXTRA"
for e in "${extras[@]}"; do run_btm "${e%%=*}" "${e#*=}"; done
if [ -n "$BTM_NDARRAY" ]; then run_btm "burn ndarray" "$BTM_NDARRAY" ndarray; fi

tout=$("$PY" "$TORCH_GPT" $shape --batch "$BATCH" --steps "$STEPS" --threads "$THREADS")
echo "$tout" | grep RESULT >&2
ttps=$(echo "$tout" | sed -n 's/^RESULT tokens_per_s=\([0-9.]*\).*/\1/p')
tgf=$(echo "$tout" | sed -n 's/^RESULT.*gflops=\([0-9.]*\).*/\1/p')
tpeak=$("$PY" - "$THREADS" <<'PY'
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
n = 2048
a, b = torch.randn(n, n), torch.randn(n, n)
a @ b
best = min((lambda t0: (a @ b, time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(5))
print(f"{2 * n**3 / best / 1e9:.1f}")
PY
)
rows+=("pytorch $("$PY" -c 'import torch; print(torch.__version__)') eager|$ttps|$tgf|$tpeak")

echo
echo "| backend | tokens/s | GFLOP/s | 2048² f32 matmul GFLOP/s | tokens/s vs torch |"
echo "|---|---:|---:|---:|---:|"
for r in "${rows[@]}"; do
  IFS='|' read -r name tps gf peak <<<"$r"
  ratio=$(python3 -c "print(f'{$tps / $ttps:.2f}x')")
  echo "| $name | $tps | $gf | $peak | $ratio |"
done
