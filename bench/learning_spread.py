"""The learning test's numbers under other processors' kernels: the spread its margin comes from.

Runs tests/test_learning.py (every method, 30 smoke steps on the shipped testbed, eval before
and after) once per setting below, each in a fresh process, and prints the eval score before and
after and the rise per method and setting. The settings are cheap stand-ins for other machines:
torch and MKL pick their kernels (and so the order of every sum) from these variables, and the
thread count splits the sums differently.

    .venv/bin/python bench/learning_spread.py            # all settings, ~15-40 min on 2 cores
    .venv/bin/python bench/learning_spread.py native-1t  # one of them
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "native-2t": {"OMP_NUM_THREADS": "2"},
    "native-1t": {"OMP_NUM_THREADS": "1"},
    "default-1t": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OMP_NUM_THREADS": "2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "2"},
}
LINE = re.compile(r"LEARNING (\S+) before=([0-9.]+) after=([0-9.]+) slip_before=([0-9.]+) slip_after=([0-9.]+)")


def run_setting(name: str) -> dict[str, tuple[float, float]]:
    env = {**os.environ, **SETTINGS[name]}
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_learning.py"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    scores, last = {}, ""
    for line in child.stdout:  # streamed, so a long run shows each method as it finishes
        if match := LINE.search(line):
            scores[match.group(1)] = tuple(float(match.group(i)) for i in range(2, 6))
            print(f"  {name}: {line.strip()}", flush=True)
        if line.strip():
            last = line.strip()
    child.wait()
    print(f"# {name}: {last} ({time.perf_counter() - started:.0f} s)", flush=True)
    return scores


def main(names: list[str]) -> None:
    results = {name: run_setting(name) for name in names}
    methods = sorted({m for scores in results.values() for m in scores})
    print("\n| method | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    rises, drops = [], []
    for method in methods:
        cells = []
        for name in names:
            if method in results[name]:
                before, after, slip_before, slip_after = results[name][method]
                rises.append(after - before)
                drops.append(slip_before - slip_after)
                cells.append(f"{before:.3f} -> {after:.3f}, slip {slip_before:.2f} -> {slip_after:.2f}")
            else:
                cells.append("n/a")
        print(f"| {method} | " + " | ".join(cells) + " |")
    if rises:
        print(f"\npass@1 rise: min {min(rises):.3f}, max {max(rises):.3f}; slip drop: min {min(drops):.3f}, "
              f"max {max(drops):.3f}; over {len(rises)} runs")


if __name__ == "__main__":
    main(sys.argv[1:] or list(SETTINGS))
