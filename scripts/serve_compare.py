#!/usr/bin/env python3
"""Greedy completions of two running `eep serve` instances must be equal: PORT_A PORT_B (e.g. one with
EEP_RANK_RUN_AHEAD=0). Ten requests of different lengths at once, so sequences join and finish at
different steps, then three one after another. Prints how many of the 13 completions are equal."""
import json, sys, threading, urllib.request
def post(port, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["choices"][0]["text"]
bodies = [{"prompt": f"Request {i}: " + "expert " * (i % 5), "max_tokens": 20 + 13 * i, "temperature": 0,
           "ignore_eos": True} for i in range(10)]
def run(port):
    res = [None] * len(bodies)
    def one(i): res[i] = post(port, bodies[i])
    th = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    [t.start() for t in th]; [t.join() for t in th]
    seq = [post(port, b) for b in bodies[:3]]
    return res + seq
a, b = run(int(sys.argv[1])), run(int(sys.argv[2]))
same = sum(x == y for x, y in zip(a, b))
print(f"completions equal: {same} of {len(a)}" + ("" if same == len(a) else " MISMATCH"))
