"""The card's confidence intervals: time of 1,000 patient-level bootstrap resamples on a split shaped
like the held-back one (700 patients), which every registration computes for val, test and stress val.

    PYTHONPATH=. python benchmarks/bootstrap.py [--patients 700] [--boot 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from pneumo.evaluate import bootstrap_ci


def held_back_like(n_patients: int, seed: int = 0):
    """Labels, probabilities and patient ids: 37.5% NORMAL, AUC ~0.9 (as tests/code/test_evaluate.py)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n_patients) >= 0.375).astype(int)
    logit = np.where(y == 1, 1.2, -0.8) + rng.normal(0, 1.0, n_patients)
    return y, 1 / (1 + np.exp(-logit)), np.arange(n_patients)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=700)
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    y, p, patients = held_back_like(args.patients)
    bootstrap_ci(y, p, patients, n_boot=50)  # warm up
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        bootstrap_ci(y, p, patients, n_boot=args.boot)
        times.append(time.perf_counter() - started)
    print(f"bootstrap_ci: {args.boot} resamples of {args.patients} patients: median {statistics.median(times):.3f} s "
          f"(min {min(times):.3f}, max {max(times):.3f}, {args.repeats} repeats; load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
