#!/usr/bin/env bash
# Soak (issue 13): a local network of N btm-node processes on 127.0.0.1, a quarter of them
# hostile, for SECS seconds. One maintainer (`seed publish --accept-verified`), N/4 adversaries
# (`btm-node adversary`: garbage DHT PUTs and gossip, bad and lying ELM records, claim squatting,
# forged attestations) and the rest honest volunteers (`join`: claim, train, announce, then serve
# and verify until stopped; with more volunteers than the 8 domains, several co-train one).
#
#   bash bench/soak.sh                                   # 16 nodes, 600 s, runs/soak
#   bash bench/soak.sh --nodes 8 --secs 60 --steps 30    # the CI variant
#   BTM_NODE=/path/to/btm-node SOAK_DIR=/tmp/soak bash bench/soak.sh
#
# Flags (or environment): --nodes N (SOAK_NODES, 16), --secs S (SOAK_SECS, 600), --dir D
# (SOAK_DIR, runs/soak), --btm-node P (BTM_NODE; default target/release/btm-node, else
# $CARGO_TARGET_DIR/release/btm-node), --steps S (SOAK_STEPS, 40: updates of each ELM),
# --seed-steps S (SOAK_SEED_STEPS, 60), --grace S (SOAK_GRACE, 300: after SECS, how long to keep
# going while honest ELMs are still unannounced or unaccepted), --max-rss-mib M (SOAK_MAX_RSS_MIB,
# 512: the bound on every honest node's peak RSS; debug builds of the tiny preset peak near 220).
#
# The network runs for at least SECS seconds after the last node started (the whole duration,
# even when every honest ELM is accepted early), then up to GRACE seconds more while an honest
# ELM is missing. Every honest process's VmHWM and VmRSS (/proc/PID/status) are sampled every
# 2 s. Then every process gets SIGTERM (SIGKILL after 10 s). Verdict: every honest volunteer
# announced an ELM (status.json `elm`), every one of them is in the maintainer's `accepted`, no
# honest process exited before the end, and every honest peak RSS is within the bound.
#
# Prints a Markdown table (per node: role, domain, ELM, accepted, peak RSS) and writes
# <dir>/soak.json; exits 1 when the verdict is fail, 2 on bad usage or a failed setup.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
NODES=${SOAK_NODES:-16}
SECS=${SOAK_SECS:-600}
DIR=${SOAK_DIR:-runs/soak}
STEPS=${SOAK_STEPS:-40}
SEED_STEPS=${SOAK_SEED_STEPS:-60}
GRACE=${SOAK_GRACE:-300}
MAX_RSS_MIB=${SOAK_MAX_RSS_MIB:-512}
BTM=${BTM_NODE:-}

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) NODES=$2; shift 2 ;;
    --secs) SECS=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --btm-node) BTM=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --seed-steps) SEED_STEPS=$2; shift 2 ;;
    --grace) GRACE=$2; shift 2 ;;
    --max-rss-mib) MAX_RSS_MIB=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "soak: unknown argument $1" >&2; usage ;;
  esac
done
for v in NODES SECS STEPS SEED_STEPS GRACE MAX_RSS_MIB; do
  case ${!v} in ''|*[!0-9]*) echo "soak: $v must be a whole number, not '${!v}'" >&2; exit 2 ;; esac
done
if [ "$NODES" -lt 2 ]; then echo "soak: --nodes must be at least 2" >&2; exit 2; fi
if [ -z "$BTM" ]; then
  if [ -x "$ROOT/target/release/btm-node" ]; then
    BTM=$ROOT/target/release/btm-node
  elif [ -n "${CARGO_TARGET_DIR:-}" ] && [ -x "$CARGO_TARGET_DIR/release/btm-node" ]; then
    BTM=$CARGO_TARGET_DIR/release/btm-node
  else
    echo "soak: no btm-node binary: build one (cargo build --release -p btm-cli) or set BTM_NODE" >&2
    exit 2
  fi
fi
if [ ! -x "$BTM" ]; then echo "soak: $BTM is not an executable" >&2; exit 2; fi

HOSTILE=$((NODES / 4))
HONEST=$((NODES - 1 - HOSTILE))   # volunteers; the maintainer is the other honest node

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
LOGS=$DIR/logs
# A fresh network each run; a seed trained with the same settings is kept.
rm -rf "$DIR"/maintainer "$DIR"/vol-* "$DIR"/adv-* "$LOGS" "$DIR"/network.toml \
  "$DIR"/root.cbor "$DIR"/maintainer.key "$DIR"/soak.json "$DIR"/maintainer-status-at-end.json
mkdir -p "$LOGS"

say() { echo "[soak $(date +%H:%M:%S)] $*" >&2; }

# --- JSON: jq when there is one, else python3 ---------------------------------------------------
if command -v jq >/dev/null 2>&1; then
  # json_field FILE FIELD: the field's value (strings bare), empty if missing or null.
  json_field() { jq -r --arg f "$2" '.[$f] // empty' "$1" 2>/dev/null || true; }
  # json_in FILE FIELD VALUE: whether the list FIELD holds VALUE.
  # json_ok TEXT: whether TEXT is one JSON value.
  json_ok() { [ -n "$1" ] && printf '%s' "$1" | jq -e . >/dev/null 2>&1; }
  json_in() { jq -e --arg f "$2" --arg v "$3" '(.[$f] // []) | index($v) != null' "$1" >/dev/null 2>&1; }
  # json_len FILE FIELD: the length of the list FIELD (0 if missing).
  json_len() { jq -r --arg f "$2" '(.[$f] // []) | length' "$1" 2>/dev/null || echo 0; }
else
  json_field() {
    python3 - "$1" "$2" <<'EOF' 2>/dev/null || true
import json, sys
try:
    v = json.load(open(sys.argv[1])).get(sys.argv[2])
except Exception:
    v = None
print("" if v is None else v)
EOF
  }
  json_ok() {
    [ -n "$1" ] && printf '%s' "$1" | python3 -c 'import json, sys; json.load(sys.stdin)' 2>/dev/null
  }
  json_in() {
    python3 - "$1" "$2" "$3" <<'EOF' 2>/dev/null
import json, sys
try:
    ok = sys.argv[3] in (json.load(open(sys.argv[1])).get(sys.argv[2]) or [])
except Exception:
    ok = False
sys.exit(0 if ok else 1)
EOF
  }
  json_len() {
    python3 - "$1" "$2" <<'EOF' 2>/dev/null || echo 0
import json, sys
try:
    print(len(json.load(open(sys.argv[1])).get(sys.argv[2]) or []))
except Exception:
    print(0)
EOF
  }
fi

# --- processes ------------------------------------------------------------------------------------
NAMES=() ROLES=() PIDS=() DIRS=() PEAK_KB=() DIED_AT=() EXIT=()

cleanup() {
  local pid
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

# spawn NAME ROLE DATA_DIR ARGS...: starts btm-node; stdout to logs/NAME.out, stderr to logs/NAME.log.
spawn() {
  local name=$1 role=$2 data=$3
  shift 3
  "$BTM" "$@" </dev/null >"$LOGS/$name.out" 2>"$LOGS/$name.log" &
  NAMES+=("$name") ROLES+=("$role") PIDS+=("$!") DIRS+=("$data") PEAK_KB+=(0) DIED_AT+=("") EXIT+=("")
}

alive() {  # PID: running and not a zombie
  [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

# Samples every live process's VmHWM and VmRSS into its peak; notes processes that exited.
sample() {
  local i kb
  for i in "${!PIDS[@]}"; do
    if alive "${PIDS[$i]}"; then
      kb=$(awk '/^(VmHWM|VmRSS):/ { if ($2 > m) m = $2 } END { print m + 0 }' \
        "/proc/${PIDS[$i]}/status" 2>/dev/null) || kb=0
      kb=${kb%%[!0-9]*}
      if [ "${kb:-0}" -gt "${PEAK_KB[$i]}" ]; then PEAK_KB[i]=$kb; fi
    elif [ -z "${DIED_AT[$i]}" ]; then
      DIED_AT[i]=$(( $(date +%s) - T0 ))
      say "${NAMES[$i]} (${ROLES[$i]}) exited early; its log ends with:"
      tail -n 5 "$LOGS/${NAMES[$i]}.log" >&2 || true
    fi
  done
}

fail_setup() {
  say "$1"
  [ -n "${2:-}" ] && tail -n 20 "$2" >&2
  exit 2
}

# --- 1. keys and the network's root (one maintainer, threshold 1) ---------------------------------
T_SETUP=$(date +%s)
"$BTM" --json keys generate --out "$DIR/maintainer.key" >"$LOGS/keys.json" 2>"$LOGS/keys.log" \
  || fail_setup "keys generate failed" "$LOGS/keys.log"
PK=$(json_field "$LOGS/keys.json" public_key)
[ -n "$PK" ] || fail_setup "keys generate printed no public_key" "$LOGS/keys.json"
"$BTM" registry root-init --maintainer "$PK" --threshold 1 --out "$DIR/root.cbor" \
  >"$LOGS/root.log" 2>&1 || fail_setup "registry root-init failed" "$LOGS/root.log"
"$BTM" registry sign --file "$DIR/root.cbor" --key "$DIR/maintainer.key" \
  >>"$LOGS/root.log" 2>&1 || fail_setup "registry sign failed" "$LOGS/root.log"

# --- 2. a tiny seed --------------------------------------------------------------------------------
SEED=$DIR/seed
SEED_TAG="tiny $SEED_STEPS 4"
if [ -f "$SEED/model.safetensors" ] && [ "$(cat "$SEED/soak-seed.txt" 2>/dev/null)" = "$SEED_TAG" ]; then
  say "reusing the seed in $SEED ($SEED_TAG)"
else
  say "training a tiny seed ($SEED_STEPS updates)"
  rm -rf "$SEED"
  "$BTM" seed train --preset tiny --steps "$SEED_STEPS" --batch-size 4 --eval-tokens 2048 \
    --out "$SEED" >"$LOGS/seed.log" 2>&1 || fail_setup "seed train failed" "$LOGS/seed.log"
  echo "$SEED_TAG" >"$SEED/soak-seed.txt"
fi

# --- 3. the maintainer -----------------------------------------------------------------------------
LISTEN=/ip4/127.0.0.1/tcp/0
NETWORK=$DIR/network.toml
T0=$(date +%s)
spawn maintainer maintainer "$DIR/maintainer" \
  seed publish --root "$DIR/root.cbor" --key "$DIR/maintainer.key" --seed "$SEED" \
  --data-dir "$DIR/maintainer" --listen "$LISTEN" --eval-tokens 2048 \
  --network-out "$NETWORK" --accept-verified
say "maintainer started (pid ${PIDS[0]}); waiting for the registry"
deadline=$(( $(date +%s) + 180 ))
until [ -f "$NETWORK" ] && [ -n "$(json_field "$DIR/maintainer/status.json" registry_version)" ]; do
  alive "${PIDS[0]}" || fail_setup "the maintainer exited before publishing" "$LOGS/maintainer.log"
  [ "$(date +%s)" -lt "$deadline" ] || fail_setup "no registry within 180 s" "$LOGS/maintainer.log"
  sleep 0.5
done
T_SETUP=$(( $(date +%s) - T_SETUP ))

# --- 4. adversaries and volunteers ---------------------------------------------------------------
for i in $(seq 1 "$HOSTILE"); do
  spawn "adv-$i" adversary "$DIR/adv-$i" \
    adversary --network "$NETWORK" --data-dir "$DIR/adv-$i" --listen "$LISTEN" --wait-registry 300
  sleep 0.3
done
for i in $(seq 1 "$HONEST"); do
  spawn "vol-$i" volunteer "$DIR/vol-$i" \
    join --network "$NETWORK" --data-dir "$DIR/vol-$i" --steps "$STEPS" --batch-size 4 \
    --lease-secs 60 --checkpoint-every 10 --listen "$LISTEN" --wait-registry 300
  sleep 0.3
done
say "$NODES nodes: 1 maintainer, $HONEST honest volunteers, $HOSTILE adversaries; soaking for $SECS s"

# --- 5. soak ---------------------------------------------------------------------------------------
# Honest volunteers whose ELM is announced, and announced and accepted.
progress() {
  ANNOUNCED=0 ACCEPTED=0
  local i elm
  for i in "${!PIDS[@]}"; do
    [ "${ROLES[$i]}" = volunteer ] || continue
    elm=$(json_field "${DIRS[$i]}/status.json" elm)
    [ -n "$elm" ] || continue
    ANNOUNCED=$((ANNOUNCED + 1))
    if json_in "$DIR/maintainer/status.json" accepted "$elm"; then ACCEPTED=$((ACCEPTED + 1)); fi
  done
}
T_START=$(date +%s)
last_note=$T_START
while :; do
  sample
  now=$(date +%s)
  ran=$((now - T_START))
  if [ $((now - last_note)) -ge 30 ]; then
    progress
    say "t=${ran}s: $ANNOUNCED of $HONEST honest ELMs announced, $ACCEPTED accepted"
    last_note=$now
  fi
  if [ "$ran" -ge "$SECS" ]; then
    progress
    if [ "$ACCEPTED" -ge "$HONEST" ]; then break; fi
    if [ "$ran" -ge $((SECS + GRACE)) ]; then
      say "grace of $GRACE s over: $ANNOUNCED announced, $ACCEPTED accepted of $HONEST"
      break
    fi
    # Every honest volunteer gone: nothing more can be announced.
    honest_left=0
    for i in "${!PIDS[@]}"; do
      if [ "${ROLES[$i]}" = volunteer ] && [ -z "${DIED_AT[$i]}" ]; then honest_left=1; fi
    done
    [ "$honest_left" = 1 ] || break
  fi
  sleep 2
done
RAN=$(( $(date +%s) - T_START ))

# --- 6. stop: SIGTERM, SIGKILL after 10 s ------------------------------------------------------------
sample
progress
# The verdicts are read before stopping (a stopping node rewrites its status).
FINAL=$DIR/maintainer-status-at-end.json
cp "$DIR/maintainer/status.json" "$FINAL" 2>/dev/null || echo '{}' >"$FINAL"
ELMS=() DOMAINS=()
for i in "${!PIDS[@]}"; do
  ELMS+=("$(json_field "${DIRS[$i]}/status.json" elm)")
  DOMAINS+=("$(json_field "${DIRS[$i]}/status.json" domain)")
done
say "stopping every node (SIGTERM)"
for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
deadline=$(( $(date +%s) + 10 ))
for i in "${!PIDS[@]}"; do
  while alive "${PIDS[$i]}" && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
  if alive "${PIDS[$i]}"; then
    kill -KILL "${PIDS[$i]}" 2>/dev/null || true
    EXIT[i]=killed
  fi
done
for i in "${!PIDS[@]}"; do
  code=0
  wait "${PIDS[$i]}" 2>/dev/null || code=$?
  if [ -z "${EXIT[$i]}" ]; then EXIT[i]=$code; fi
done
trap - EXIT

# --- 7. verdict, table, soak.json ------------------------------------------------------------------
PASS=true
REASONS=()
MAX_HONEST_KB=0
rows_md=""
rows_json=""
for i in "${!PIDS[@]}"; do
  name=${NAMES[$i]} role=${ROLES[$i]} elm=${ELMS[$i]} domain=${DOMAINS[$i]}
  mib=$(( (PEAK_KB[i] + 1023) / 1024 ))
  accepted=null
  if [ "$role" != adversary ]; then
    if [ "${PEAK_KB[$i]}" -gt "$MAX_HONEST_KB" ]; then MAX_HONEST_KB=${PEAK_KB[$i]}; fi
    if [ -n "${DIED_AT[$i]}" ]; then
      PASS=false; REASONS+=("$name exited early (after ${DIED_AT[$i]} s)")
    fi
    if [ "$mib" -gt "$MAX_RSS_MIB" ]; then
      PASS=false; REASONS+=("$name peak RSS $mib MiB > $MAX_RSS_MIB MiB")
    fi
  fi
  if [ "$role" = volunteer ]; then
    if [ -z "$elm" ]; then
      accepted=false; PASS=false; REASONS+=("$name announced no ELM")
    elif json_in "$FINAL" accepted "$elm"; then
      accepted=true
    else
      accepted=false; PASS=false; REASONS+=("$name's ELM ${elm:0:8} was not accepted")
    fi
  fi
  status=ok
  if [ -n "${DIED_AT[$i]}" ]; then status="exited at ${DIED_AT[$i]} s"; fi
  sent=""
  if [ "$role" = adversary ]; then
    sent=$(tail -n 1 "$LOGS/$name.out" 2>/dev/null || true)
    json_ok "$sent" || sent=""
  fi
  acc_md=-
  case $accepted in true) acc_md=yes ;; false) acc_md=**no** ;; esac
  short=${elm:0:8}
  rows_md+="| $name | $role | ${domain:--} | ${short:--} | $acc_md | $mib | $status | ${EXIT[$i]} |"$'\n'
  [ -n "$rows_json" ] && rows_json+=","
  rows_json+=$(printf '\n    {"name": "%s", "role": "%s", "domain": %s, "elm": %s, "accepted": %s, "peak_rss_mib": %d, "died_at_secs": %s, "exit": "%s", "sent": %s}' \
    "$name" "$role" \
    "$( [ -n "$domain" ] && printf '"%s"' "$domain" || echo null)" \
    "$( [ -n "$elm" ] && printf '"%s"' "$elm" || echo null)" \
    "$accepted" "$mib" "${DIED_AT[$i]:-null}" "${EXIT[$i]}" "${sent:-null}")
done
MAX_HONEST_MIB=$(( (MAX_HONEST_KB + 1023) / 1024 ))

echo
# Nothing but honest ELMs may be accepted: the adversaries' bad ELMs never are.
TOTAL_ACCEPTED=$(json_len "$FINAL" accepted)
if [ "$TOTAL_ACCEPTED" -gt "$ACCEPTED" ]; then
  PASS=false
  REASONS+=("the maintainer accepted $TOTAL_ACCEPTED ELMs, $ACCEPTED of them honest")
fi
echo "## Soak: $NODES nodes ($HONEST honest volunteers, 1 maintainer, $HOSTILE adversaries), ${RAN} s"
echo
echo "| node | role | domain | ELM | accepted | peak RSS MiB | status | exit |"
echo "|---|---|---|---|---|---:|---|---|"
printf '%s' "$rows_md"
echo
echo "honest ELMs announced: $ANNOUNCED of $HONEST, accepted: $ACCEPTED; ELMs accepted in all: $TOTAL_ACCEPTED; max honest peak RSS: $MAX_HONEST_MIB MiB (bound $MAX_RSS_MIB MiB); setup ${T_SETUP} s"
if $PASS; then
  echo "verdict: PASS"
else
  echo "verdict: FAIL"
  for r in "${REASONS[@]}"; do echo "- $r"; done
fi

reasons_json=""
for r in "${REASONS[@]+"${REASONS[@]}"}"; do
  [ -n "$reasons_json" ] && reasons_json+=", "
  reasons_json+="\"$r\""
done
cat >"$DIR/soak.json" <<EOF
{
  "nodes": $NODES,
  "honest_volunteers": $HONEST,
  "adversaries": $HOSTILE,
  "secs": $SECS,
  "ran_secs": $RAN,
  "setup_secs": $T_SETUP,
  "steps": $STEPS,
  "announced": $ANNOUNCED,
  "accepted": $ACCEPTED,
  "accepted_in_all": $TOTAL_ACCEPTED,
  "max_honest_peak_rss_mib": $MAX_HONEST_MIB,
  "max_rss_bound_mib": $MAX_RSS_MIB,
  "pass": $PASS,
  "reasons": [$reasons_json],
  "rows": [$rows_json
  ]
}
EOF
say "wrote $DIR/soak.json"
$PASS || exit 1
