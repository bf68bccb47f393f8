#!/usr/bin/env python3
"""Summarises an `ncu --metrics gpu__time_duration.sum --csv` log of `eep bench decode`: the
kernels of step STEP (0 = prefill; a step starts at each EmbedKernel), grouped by kernel name,
with their total time.  usage: ncu_steps.py FILE.csv [STEP]"""
import csv, re, sys
from collections import OrderedDict

rows = []
with open(sys.argv[1], newline="") as f:
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    rows.append((r["Kernel Name"], float(r["Metric Value"].replace(",", "")) / 1e3, r.get("Grid Size", ""), r.get("Block Size", "")))
step = int(sys.argv[2]) if len(sys.argv) > 2 else 2
starts = [i for i, r in enumerate(rows) if "EmbedKernel" in r[0]]
if len(starts) <= step:
    print(f"only {len(starts)} steps found")
    sys.exit(0)
end = starts[step + 1] if step + 1 < len(starts) else len(rows)
sel = rows[starts[step]:end]
agg = OrderedDict()
for name, us, grid, block in sel:
    short = re.sub(r"\(.*", "", name)
    short = re.sub(r"^.*::", "", short) if "<" not in short else short.split("(")[0]
    short = short[-60:]
    a = agg.setdefault(short, [0, 0.0, grid, block])
    a[0] += 1
    a[1] += us
total = sum(a[1] for a in agg.values())
print(f"step {step}: {len(sel)} kernels, {total:.1f} us of kernel time")
for k, (n, us, grid, block) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    print(f"{us:9.1f} us {n:4d}x {us / n:8.2f} us/launch  {k}  grid {grid} block {block}")
