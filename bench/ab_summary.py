#!/usr/bin/env python3
"""Summarizes scripts/bench-ab.sh output: per build (A, B), the median and range of each figure.

    python3 bench/ab_summary.py bench/results/ab-layout.txt
"""
import re
import statistics
import sys
from collections import defaultdict


def spread(values):
    values = sorted(values)
    return f"{statistics.median(values):.2f} ({values[0]:.2f} to {values[-1]:.2f}, n={len(values)})"


def main(path):
    figures = defaultdict(list)  # (figure, sink, build) -> values
    for line in open(path, encoding="utf-8"):
        m = re.match(r"build=(\w) (.*)", line)
        if not m:
            continue
        build, rest = m.groups()
        if r := re.match(r"RATIO sink=(\w+) run=\d+ bridge/bare=([\d.]+)", rest):
            figures[("throughput ratio bridge/bare", r[1], build)].append(float(r[2]))
        elif c := re.match(r"CPU sink=(\w+) run=\d+ bridge=([\d.]+) bare=([\d.]+)", rest):
            figures[("throughput bridge CPU s per M events", c[1], build)].append(float(c[2]))
            figures[("throughput bare CPU s per M events", c[1], build)].append(float(c[3]))
        elif rest.startswith("| throughput | bridge |") or rest.startswith("| latency | bridge |"):
            cells = [x.strip() for x in rest.strip().strip("|").split("|")]
            scenario, sink = cells[0], cells[2]
            if scenario == "throughput":
                figures[("throughput bridge ev/s", sink, build)].append(float(cells[6]))
            else:
                figures[("latency bridge p50 ms", sink, build)].append(float(cells[7]))
                figures[("latency bridge p99 ms", sink, build)].append(float(cells[8]))
                figures[("latency bridge p99.9 ms", sink, build)].append(float(cells[9]))
        elif d := re.match(r"BACKLOG drained distinct=\d+ of \d+ at (\d+) ev/s.*peak RSS ([\d.]+) MB", rest):
            figures[("backlog drain ev/s", "nats", build)].append(float(d[1]))
            figures[("backlog bridge peak RSS MB", "nats", build)].append(float(d[2]))
        elif b := re.match(r"BACKLOG bridge CPU: spooling ([\d.]+) .*draining ([\d.]+)", rest):
            figures[("backlog bridge CPU s per M, spooling", "nats", build)].append(float(b[1]))
            figures[("backlog bridge CPU s per M, draining", "nats", build)].append(float(b[2]))
    print("| figure | sink | A: median (range, runs) | B: median (range, runs) | A/B |")
    print("|---|---|---|---|---|")
    for figure, sink in sorted({(f, s) for f, s, _ in figures}):
        a, b = figures.get((figure, sink, "A"), []), figures.get((figure, sink, "B"), [])
        if not a or not b:
            continue
        ratio = statistics.median(a) / statistics.median(b)
        print(f"| {figure} | {sink} | {spread(a)} | {spread(b)} | {ratio:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
