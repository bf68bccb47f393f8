#!/usr/bin/env python3
"""[gpu4] The failure and scaling scenario of four ranks, through `eep serve`:
  (a) `--ep 4 --num-redundant-experts 8` with the DRAM backup, 8 concurrent greedy requests, rank 2
      SIGKILLed while they run: all finish with the tokens of the no-failure 4-rank run, orphaned
      experts from the DRAM mirror;
  (b) POST /scale 4 -> 2 -> 4 while requests run: none lost, tokens unchanged.
On 4 GPUs: EEP_BACKEND=cuda EEP_COMMUNICATOR=nccl (one rank per GPU). On a CPU machine the
defaults (cpu, shm) run the same scenario. Standard library only.
Usage: scenario-ep4.py EEP_BIN MODEL [RANKS]"""
import json, os, signal, subprocess, sys, threading, time, urllib.request

eep, model = sys.argv[1], sys.argv[2]
RANKS = int(sys.argv[3]) if len(sys.argv) > 3 else 4
PROMPTS = [[1 + i, 7 + 2 * i, 3 + i, 11 + i] for i in range(8)]
MAX_TOKENS = int(os.environ.get("EEP_MAX_TOKENS", "200"))
BACKEND = os.environ.get("EEP_BACKEND", "cpu")
COMM = os.environ.get("EEP_COMMUNICATOR", "shm")
LOGDIR = os.environ.get("EEP_LOGDIR", "/tmp")


def start(name, *flags):
    err = open(f"{LOGDIR}/scenario-{name}.err", "w")
    p = subprocess.Popen([eep, "serve", "--model", model, "--port", "0", "--backend", BACKEND,
                          "--ep-communicator", COMM, "--num-redundant-experts", "8", "--log-level", "info", *flags],
                         stdout=subprocess.PIPE, stderr=err, text=True)
    line = p.stdout.readline().strip()
    assert line.startswith("listening "), f"{name}: {line}; see {LOGDIR}/scenario-{name}.err"
    return p, line.split()[1]


def call(url, path, body=None):
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.status, json.loads(r.read())


def run_all(url):
    out = [None] * len(PROMPTS)
    def one(i):
        _, j = call(url, "/v1/completions", {"prompt": PROMPTS[i], "max_tokens": MAX_TOKENS, "temperature": 0,
                                              "ignore_eos": True, "return_token_ids": True})
        out[i] = j["choices"][0]["token_ids"]
    ts = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in ts: t.start()
    return ts, out


def wait_steps(url, n):
    deadline = time.time() + 120
    while time.time() < deadline:
        if call(url, "/v1/cluster")[1]["steps"] >= n: return
        time.sleep(0.01)


def settled(url, size):
    deadline = time.time() + 300
    while time.time() < deadline:
        _, c = call(url, "/v1/cluster")
        alive = sum(r["state"] == "alive" for r in c["ranks"])
        if alive == size and not any(r["state"] in ("joining", "draining") for r in c["ranks"]): return c
        time.sleep(0.05)
    raise SystemExit(f"cluster did not settle at {size} ranks")


def event_summary(e):
    return {k: e[k] for k in ("kind", "dead_ranks", "members", "detect_ms", "abort_ms", "plan_ms", "restore_ms",
                              "blocking_ms", "resume_ms", "experts", "requeued_seqs")}


p, url = start("ep4", "--ep", str(RANKS), "--expert-backup", "on")
ts, ref = run_all(url)
for t in ts: t.join()
print(f"{RANKS} ranks ({BACKEND}, {COMM}), 8 requests x {MAX_TOKENS} tokens: reference done")

# (a) kill rank 2 under load
steps0 = call(url, "/v1/cluster")[1]["steps"]
ts, got = run_all(url)
wait_steps(url, steps0 + 10)
_, c = call(url, "/v1/cluster")
pid = [r["pid"] for r in c["ranks"] if r["id"] == 2][0]
t_kill = time.time()
os.kill(pid, signal.SIGKILL)
for t in ts: t.join()
ok_a = all(g == r for g, r in zip(got, ref))
_, c = call(url, "/v1/cluster")
ev = c["events"][-1]
print(f"(a) rank 2 (pid {pid}) SIGKILLed under load: outputs equal the no-failure run: {ok_a}; "
      f"all done {time.time() - t_kill:.2f} s after the kill")
print("    ", json.dumps(event_summary(ev)))
ok_a = ok_a and ev["kind"] == "failover" and ev["experts"]["backup"] > 0 and ev["experts"]["disk"] == 0
call(url, "/scale", {"ep_size": RANKS})
settled(url, RANKS)
print(f"    replaced: back to {RANKS} ranks:", json.dumps(event_summary(call(url, '/v1/cluster')[1]["events"][-1])))

# (b) 4 -> 2 -> 4 under load
ok_b = True
for size in (2, RANKS):
    steps0 = call(url, "/v1/cluster")[1]["steps"]
    ts, got = run_all(url)
    wait_steps(url, steps0 + 10)
    t0 = time.time()
    st, _ = call(url, "/scale", {"ep_size": size})
    c = settled(url, size)
    for t in ts: t.join()
    same = all(g == r for g, r in zip(got, ref))
    ok_b = ok_b and st == 202 and same
    print(f"(b) scale to {size} under load: HTTP {st}, settled {time.time() - t0:.2f} s, 8/8 requests done, "
          f"outputs equal: {same}")
    print("    ", json.dumps(event_summary(c["events"][-1])))

p.send_signal(signal.SIGTERM)
p.wait(60)
print("PASS" if ok_a and ok_b else "FAIL")
sys.exit(0 if ok_a and ok_b else 1)
