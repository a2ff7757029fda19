"""The learning test's numbers under other processors' kernels: the spread its margin comes from.

Runs tests/test_learning.py (every method, 20 smoke steps on the shipped testbed, eval before
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
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OMP_NUM_THREADS": "2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "2"},
}
LINE = re.compile(r"LEARNING (\S+) before=([0-9.]+) after=([0-9.]+)")


def run_setting(name: str) -> dict[str, tuple[float, float]]:
    env = {**os.environ, **SETTINGS[name]}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_learning.py"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    scores = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in LINE.finditer(done.stdout)}
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    print(f"# {name}: {tail} ({time.perf_counter() - started:.0f} s)", flush=True)
    return scores


def main(names: list[str]) -> None:
    results = {name: run_setting(name) for name in names}
    methods = sorted({m for scores in results.values() for m in scores})
    print("\n| method | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    rises = []
    for method in methods:
        cells = []
        for name in names:
            if method in results[name]:
                before, after = results[name][method]
                rises.append(after - before)
                cells.append(f"{before:.3f} -> {after:.3f} (+{after - before:.3f})")
            else:
                cells.append("n/a")
        print(f"| {method} | " + " | ".join(cells) + " |")
    if rises:
        print(f"\nrise: min {min(rises):.3f}, max {max(rises):.3f}, over {len(rises)} runs")


if __name__ == "__main__":
    main(sys.argv[1:] or list(SETTINGS))
