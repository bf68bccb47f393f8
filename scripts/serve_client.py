#!/usr/bin/env python3
"""Greedy load on a running `eep serve`: PORT N MAX_TOKENS. One warm-up request, then 4 requests
one after another, then N at once (threads); prints requests/s and completion tokens/s of both.
Used for the serving figures in bench/RESULTS.md (session 9)."""
import json, sys, threading, time, urllib.request
port = int(sys.argv[1]); n = int(sys.argv[2]); max_tokens = int(sys.argv[3])
def post(body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())
bodies = [{"prompt": f"Request {i}: expert parallel inference", "max_tokens": max_tokens, "temperature": 0,
           "ignore_eos": True} for i in range(n)]
# warm-up
post(bodies[0])
t = time.time(); toks = 0
for b in bodies[:4]:
    toks += post(b)["usage"]["completion_tokens"]
seq = time.time() - t
print(f"sequential: 4 req, {toks} tok in {seq:.2f}s -> {4/seq:.1f} req/s, {toks/seq:.0f} tok/s")
res = [None]*n
def run(i): res[i] = post(bodies[i])
t = time.time()
th = [threading.Thread(target=run, args=(i,)) for i in range(n)]
[x.start() for x in th]; [x.join() for x in th]
dt = time.time() - t
toks = sum(r["usage"]["completion_tokens"] for r in res)
print(f"concurrent: {n} req, {toks} tok in {dt:.2f}s -> {n/dt:.1f} req/s, {toks/dt:.0f} tok/s")
