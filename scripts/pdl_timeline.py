#!/usr/bin/env python3
"""Summarises a kernel timeline written by a measurement build (cmake -DEEP_PDL_TRACE=ON,
EEP_PDL_TRACE_OUT=file; src/kernels/cuda/pdl.h). One line per kernel launch in stream order:
when its first and last traced blocks (the grid's first and last) started, when the first one's
wait for the predecessor returned (`wait`: the predecessor's completion as this launch saw it),
when the later of the two blocks' thread 0 finished (`end`), a kernel's own marks (`marks`: the
router's last block starting to route, then inside RoutePlanBody), and `crit`, the time from this launch's release to the
next one's (its share of the step's critical path). Times in us from the first event.

  scripts/pdl_timeline.py TRACE [first_launch] [count]
"""
import sys


def main():
    path = sys.argv[1]
    first = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 10 ** 9
    ev = []
    with open(path) as f:
        for line in f:
            ev.append(tuple(map(int, line.split())))
    ev.sort()
    t0 = ev[0][0]
    launches = []
    for t, kind, sm, grid, block in ev:
        if kind == 0:
            cur = next((l for l in reversed(launches) if l["grid"] == grid), None)
            if cur is None or block in cur["started"]:
                cur = {"grid": grid, "starts": [], "waits": [], "ends": [], "marks": [], "started": set(),
                       "waited": set(), "ended": set()}
                launches.append(cur)
            cur["starts"].append(t)
            cur["started"].add(block)
            continue
        key = {1: "waited", 2: "ended"}.get(kind)
        # The oldest launch of this grid size whose block has started and not yet done this.
        target = None
        for l in launches:
            if l["grid"] != grid:
                continue
            if key is None or (block in l["started"] and block not in l[key]):
                target = l
                if key is not None:
                    break
        if target is None:
            continue
        if kind == 1:
            target["waits"].append(t)
            target["waited"].add(block)
        elif kind == 2:
            target["ends"].append(t)
            target["ended"].add(block)
        else:
            target["marks"].append(t)
    launches.sort(key=lambda l: min(l["starts"]))
    us = lambda v: (v - t0) / 1e3
    rel = [min(l["waits"]) if l["waits"] else None for l in launches]
    print(f"{len(ev)} events, {len(launches)} launches; times in us from the first event")
    print(f"{'#':>4} {'grid':>6} {'start0':>8} {'startN':>8} {'wait':>8} {'end':>8} {'crit':>7}  marks")
    nan = float("nan")
    for i, l in enumerate(launches):
        if i < first or i >= first + count:
            continue
        nxt = next((r for r in rel[i + 1:] if r is not None), None)
        crit = (nxt - rel[i]) / 1e3 if nxt is not None and rel[i] is not None else nan
        print(f"{i:>4} {l['grid']:>6} {us(min(l['starts'])):8.2f} {us(max(l['starts'])):8.2f} "
              f"{us(rel[i]) if rel[i] else nan:8.2f} {us(max(l['ends'])) if l['ends'] else nan:8.2f} {crit:7.2f}  "
              + " ".join(f"{us(m):.2f}" for m in sorted(l["marks"])))


if __name__ == "__main__":
    main()
