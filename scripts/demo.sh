#!/usr/bin/env bash
# The main job as a user sees it: serve a small MoE model on 4 CPU ranks with the DRAM expert
# backup, send traffic (streaming and not), SIGKILL a rank under load, scale back up to 4 to
# replace it, then print a timeline read from /v1/cluster and a summary.
# Exit status: non-zero if any request failed, a greedy output changed, or a step did not settle.
#
#   scripts/demo.sh [EEP_BINARY] [MODEL_DIR]     (defaults: build/bin/eep, qwen3moe-tiny)
#
# Needs bash, curl and python3 (JSON). Builds nothing: `make demo` builds first.
set -euo pipefail
cd "$(dirname "$0")/.."

EEP=${1:-build/bin/eep}
MODEL=${2:-tests/data/models/qwen3moe-tiny}
EP=4
KILL_RANK=2
CLIENTS=4          # concurrent clients; the even ones stream
MAX_TOKENS=32
DEADLINE_S=50      # the whole demo; a step not done by then fails it

for tool in curl python3; do
  command -v "$tool" >/dev/null || { echo "demo: needs $tool (apt-get install $tool)" >&2; exit 2; }
done
[ -x "$EEP" ] || { echo "demo: no eep binary at $EEP (run make build)" >&2; exit 2; }
[ -f "$MODEL/config.json" ] || { echo "demo: no model at $MODEL" >&2; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/eep-demo.XXXXXX")
SERVER_PID=""
CLIENT_PIDS=()
cleanup() {
  touch "$WORK/stop"
  for p in "${CLIENT_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

START=$(date +%s.%N)
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):6.2f}s')" "$START" "$(date +%s.%N)"; }
say() { echo "[$(elapsed)] $*"; }
left_s() { python3 -c "import sys; print(max(0.0, float(sys.argv[1]) + $DEADLINE_S - float(sys.argv[2])))" "$START" "$(date +%s.%N)"; }
fail() {
  echo "demo: FAILED: $*" >&2
  [ -f "$WORK/server.log" ] && { echo "--- server log (tail) ---" >&2; tail -n 30 "$WORK/server.log" >&2; }
  exit 1
}

# ---- server --------------------------------------------------------------------------------
"$EEP" serve --model "$MODEL" --ep "$EP" --expert-backup on --port 0 --log-level info \
  >"$WORK/server.out" 2>"$WORK/server.log" &
SERVER_PID=$!
until grep -q '^listening ' "$WORK/server.out" 2>/dev/null; do
  kill -0 "$SERVER_PID" 2>/dev/null || fail "eep serve exited before listening"
  [ "$(left_s)" != "0.0" ] || fail "eep serve did not listen in time"
  sleep 0.1
done
URL=$(sed -n 's/^listening //p' "$WORK/server.out" | head -n 1)

cluster() { curl -sf --max-time 10 "$URL/v1/cluster"; }
# wait_cluster PY_EXPR WHAT: polls /v1/cluster until the expression (over `j`) is true.
wait_cluster() {
  while true; do
    if cluster >"$WORK/cluster.json" 2>/dev/null &&
      python3 -c "import json,sys; j=json.load(open(sys.argv[1])); sys.exit(0 if ($1) else 1)" "$WORK/cluster.json"; then
      return 0
    fi
    [ "$(left_s)" != "0.0" ] || fail "$2 (last /v1/cluster: $(cat "$WORK/cluster.json" 2>/dev/null))"
    sleep 0.05
  done
}
ranks() {
  python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(', '.join(f\"{r['id']}:{r['state']}(pid {r['pid']})\" for r in j['ranks']))" "$WORK/cluster.json"
}
wait_cluster "j['backup']['ready']" "the ranks did not reach the DRAM backup"
say "serving $(basename "$MODEL") at $URL on $EP ranks with the DRAM expert backup; ranks $(ranks)"

# ---- traffic -------------------------------------------------------------------------------
PROMPTS=(
  "Expert parallelism places experts on many GPUs."
  "The quick brown fox jumps over the lazy dog"
  "def forward(self, x):"
  "Once upon a time, in a cluster far away,"
  "Mixture-of-experts models route each token to"
  "The capital of France is"
  "1, 2, 3, 5, 8, 13,"
  "When a rank fails, the service goes on because"
)
mkdir -p "$WORK/req"
client() {
  local id=$1 stream=$2 n=0
  while [ ! -e "$WORK/stop" ]; do
    local p=$(((id * 3 + n) % ${#PROMPTS[@]}))
    local f="$WORK/req/c$id-$n"
    echo "$p $stream" >"$f.meta"
    local body
    body=$(printf '{"prompt": "%s", "max_tokens": %d, "temperature": 0, "ignore_eos": true, "return_token_ids": true, "stream": %s}' \
      "${PROMPTS[$p]}" "$MAX_TOKENS" "$stream")
    curl -sS -N --max-time 60 -o "$f.out" -w '%{http_code}' -H 'Content-Type: application/json' \
      -d "$body" "$URL/v1/completions" >"$f.code" 2>"$f.err" || true
    n=$((n + 1))
  done
}
for c in $(seq 0 $((CLIENTS - 1))); do
  if [ $((c % 2)) -eq 0 ]; then client "$c" true & else client "$c" false & fi
  CLIENT_PIDS+=($!)
done
completed() { find "$WORK/req" -name '*.code' -size +0 | wc -l; }
wait_completed() {  # N: until N requests have an answer
  while [ "$(completed)" -lt "$1" ]; do
    [ "$(left_s)" != "0.0" ] || fail "requests did not complete in time"
    sleep 0.05
  done
}
say "traffic: $CLIENTS clients in a loop ($((CLIENTS / 2)) streaming), $MAX_TOKENS greedy tokens each"
wait_completed 8

# ---- kill a rank ---------------------------------------------------------------------------
cluster >"$WORK/cluster.json"
VICTIM=$(python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(next(r['pid'] for r in j['ranks'] if r['id']==$KILL_RANK))" "$WORK/cluster.json")
[ "$VICTIM" -gt 0 ] || fail "no pid for rank $KILL_RANK"
kill -KILL "$VICTIM"
say "SIGKILL rank $KILL_RANK (pid $VICTIM) with $(completed) requests done"
wait_cluster "any(r['id']==$KILL_RANK and r['state']=='dead' for r in j['ranks']) and any(e['kind']=='failover' for e in j['events'])" \
  "the failure of rank $KILL_RANK was not recovered"
say "recovered: ranks $(ranks)"
DONE_AT_FAILOVER=$(completed)
wait_completed $((DONE_AT_FAILOVER + 8))

# ---- scale up to replace it ----------------------------------------------------------------
code=$(curl -s -o "$WORK/scale.json" -w '%{http_code}' -H 'Content-Type: application/json' -d "{\"ep_size\": $EP}" "$URL/scale")
[ "$code" = 202 ] || fail "POST /scale: $code $(cat "$WORK/scale.json")"
say "POST /scale {\"ep_size\": $EP} -> 202 $(cat "$WORK/scale.json")"
wait_cluster "sum(r['state']=='alive' for r in j['ranks'])==$EP and not any(r['state'] in ('joining','draining') for r in j['ranks']) and any(e['kind']=='scale-up' for e in j['events'])" \
  "the scale-up to $EP did not settle"
say "scaled up: ranks $(ranks)"
wait_completed $(($(completed) + 8))

# ---- stop and report -----------------------------------------------------------------------
touch "$WORK/stop"
for p in "${CLIENT_PIDS[@]}"; do wait "$p" || true; done
CLIENT_PIDS=()
cluster >"$WORK/cluster.json" || fail "GET /v1/cluster"
curl -sf --max-time 10 "$URL/metrics" >"$WORK/metrics.txt" || fail "GET /metrics"
HEALTH=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$URL/health")
say "traffic stopped; /health $HEALTH"
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || fail "eep serve exited with status $?"
SERVER_PID=""

python3 - "$WORK" "$HEALTH" <<'EOF'
import glob, json, os, sys

work, health = sys.argv[1], sys.argv[2]
cluster = json.load(open(os.path.join(work, "cluster.json")))
metrics = {}
for line in open(os.path.join(work, "metrics.txt")):
    if line and not line.startswith("#"):
        key, _, value = line.rpartition(" ")
        metrics[key] = float(value)

def kib(n):
    return f"{n / 1024:.0f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"

print("\ntimeline (from /v1/cluster events)")
for e in cluster["events"]:
    src = ", ".join(f"{e['experts'][s]} from {s} ({kib(e['bytes'][s])})" for s in ("peers", "backup", "disk"))
    head = f"  epoch {e['epoch']}  {e['kind']:<10}"
    if e["kind"] == "failover":
        print(f"{head} rank(s) {e['dead_ranks']} dead -> members {e['members']}")
        print(f"      detect {e['detect_ms']:.1f} ms | abort {e['abort_ms']:.1f} ms | plan {e['plan_ms']:.1f} ms"
              f" | restore {e['restore_ms']:.1f} ms | resume {e['resume_ms']:.1f} ms")
    else:
        print(f"{head} {e['reason']} -> members {e['members']}")
        print(f"      abort {e['abort_ms']:.1f} ms | plan {e['plan_ms']:.1f} ms | restore {e['restore_ms']:.1f} ms"
              f" | resume {e['resume_ms']:.1f} ms")
    print(f"      blocking window {e['blocking_ms']:.1f} ms; experts restored: {src};"
          f" {e['requeued_seqs']} sequence(s) resumed elsewhere")

# Requests: status, tokens, and whether each prompt's greedy output was the same every time.
sent = ok = failed = tokens = 0
by_prompt, mismatched, errors = {}, 0, []
for meta in sorted(glob.glob(os.path.join(work, "req", "*.meta"))):
    base = meta[:-5]
    sent += 1
    prompt, stream = open(meta).read().split()
    code = open(base + ".code").read().strip() if os.path.exists(base + ".code") else ""
    body = open(base + ".out", errors="replace").read() if os.path.exists(base + ".out") else ""
    ids, finish, why = [], None, None
    if code != "200":
        why = f"HTTP {code or 'no answer'}: {(body or open(base + '.err').read()).strip()[:200]}"
    elif stream == "true":
        events = [b[6:] for b in body.split("\n\n") if b.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            why = "stream did not end with [DONE]"
        for ev in events:
            if ev == "[DONE]":
                continue
            j = json.loads(ev)
            if "error" in j:
                why = f"error event: {j['error']}"
            for c in j.get("choices", []):
                ids += c.get("token_ids", [])
                finish = c.get("finish_reason") or finish
    else:
        c = json.loads(body)["choices"][0]
        ids, finish = c["token_ids"], c["finish_reason"]
    if why is None and (finish != "length" or not ids):
        why = f"finish_reason {finish}, {len(ids)} tokens"
    if why is None:
        ref = by_prompt.setdefault(prompt, ids)
        if ids != ref:
            mismatched += 1
            why = f"greedy output of prompt {prompt} changed"
    if why is None:
        ok += 1
        tokens += len(ids)
    else:
        failed += 1
        errors.append(f"{os.path.basename(base)}: {why}")

up = metrics.get('eep_scaling_events_total{direction="up"}', 0)
down = metrics.get('eep_scaling_events_total{direction="down"}', 0)
recoveries = metrics.get("eep_recoveries_total", 0)
print("\nsummary")
print(f"  requests sent {sent}, ok {ok}, failed {failed}; {tokens} tokens generated;"
      f" greedy outputs identical across the failure and the scale-up: {'yes' if mismatched == 0 else 'NO'}")
print(f"  recoveries {recoveries:.0f}, scaling steps up {up:.0f} / down {down:.0f}, epoch {cluster['epoch']},"
      f" ranks {', '.join(str(r['id']) + ':' + r['state'] for r in cluster['ranks'])}; /health {health}")
for e in errors[:10]:
    print("  FAILED", e)
bad = failed > 0 or sent == 0 or recoveries != 1 or up != 1 or health != "200"
sys.exit(1 if bad else 0)
EOF
