#!/usr/bin/env python3
"""[gpu-ep] serving on two GPUs (device kind nvidia-h200-x2): `eep serve --backend cuda --ep 2
--ep-communicator nccl` with the DRAM backup; 8 concurrent greedy requests; rank 1 SIGKILLed while
they run; all must finish with the tokens of an `--ep 1` server; then POST /scale back to 2 ranks
and serve again. Standard library only. Usage: device-gpu-ep2-serve.py EEP_BIN MODEL"""
import json, os, signal, subprocess, sys, threading, time, urllib.request

eep, model = sys.argv[1], sys.argv[2]
PROMPTS = [[1 + i, 2 + i, 3 + i, 4 + i] for i in range(8)]
MAX_TOKENS = 400


def start(*flags):
    # EEP_BACKEND / EEP_COMMUNICATOR override cuda / nccl (to try the script on a CPU machine).
    p = subprocess.Popen([eep, "serve", "--model", model, "--port", "0",
                          "--backend", os.environ.get("EEP_BACKEND", "cuda"),
                          "--ep-communicator", os.environ.get("EEP_COMMUNICATOR", "nccl"), "--log-level", "info", *flags],
                         stdout=subprocess.PIPE, stderr=open(f"/tmp/serve{len(flags)}.err", "w"), text=True)
    line = p.stdout.readline().strip()
    assert line.startswith("listening "), line
    return p, line.split()[1]


def call(url, path, body=None):
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status, json.loads(r.read())


def complete(url, ids):
    _, j = call(url, "/v1/completions", {"prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0,
                                          "ignore_eos": True, "return_token_ids": True})
    return j["choices"][0]["token_ids"]


def run_all(url):
    out = [None] * len(PROMPTS)
    def one(i):
        out[i] = complete(url, PROMPTS[i])
    ts = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in ts: t.start()
    return ts, out


ref_p, ref_url = start("--ep", "1")
ts, ref = run_all(ref_url)
for t in ts: t.join()
ref_p.send_signal(signal.SIGTERM); ref_p.wait(60)

p, url = start("--ep", "2", "--expert-backup", "on")
ts, got = run_all(url)
time.sleep(0.5)
_, c = call(url, "/v1/cluster")
pid = [r["pid"] for r in c["ranks"] if r["id"] == 1][0]
t_kill = time.time()
os.kill(pid, signal.SIGKILL)
for t in ts: t.join()
ok = all(g == r for g, r in zip(got, ref))
print(f"kill rank 1 (pid {pid}) under 8 requests x {MAX_TOKENS} tokens: outputs equal --ep 1: {ok}; "
      f"all done {time.time() - t_kill:.2f} s after the kill")
_, c = call(url, "/v1/cluster")
print("after failover:", [(r["id"], r["state"]) for r in c["ranks"]],
      [{k: e[k] for k in ("kind", "dead_ranks", "members", "detect_ms", "abort_ms", "restore_ms", "blocking_ms", "experts")}
       for e in c["events"]])
st, j = call(url, "/scale", {"ep_size": 2})
print("POST /scale 2 ->", st, j)
deadline = time.time() + 120
while time.time() < deadline:
    _, c = call(url, "/v1/cluster")
    if sum(r["state"] == "alive" for r in c["ranks"]) == 2 and not any(r["state"] in ("joining", "draining") for r in c["ranks"]):
        break
    time.sleep(0.2)
print("after scale-up:", [(r["id"], r["state"]) for r in c["ranks"]],
      {k: c["events"][-1][k] for k in ("kind", "members", "blocking_ms", "experts")})
ts, again = run_all(url)
for t in ts: t.join()
ok2 = all(g == r for g, r in zip(again, ref))
print(f"serving on 2 ranks again: outputs equal --ep 1: {ok2}")
p.send_signal(signal.SIGTERM); p.wait(60)
sys.exit(0 if ok and ok2 else 1)
