"""Two processes promote at the same moment, many times: does `champion` end on the better version?

Each trial has its own registry folder (or S3 prefix) with v0001 as champion (val ROC AUC
0.50) and two challengers that both beat it: v0002 (0.95) and v0003 (0.60). Two worker
processes, one per challenger, wait on a barrier and then promote together. The right
ending is v0002 as champion, with v0003 told it was not promoted.

    python -m tests.code.promotion_race --trials 200 [--registry s3://bucket/prefix] [--api old]

``--api old`` runs the promotion as tasks/train.py did before compare-and-swap (read the
champion, compare, ``promote_if_better``), to measure the old code with the same harness:
run it with ``PYTHONPATH=<checkout of the old code>``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import time

import torch

from pneumo import registry, storage
from pneumo.model import TinyNet

MODEL = "m"
SCORES = {"v0001": 0.50, "v0002": 0.95, "v0003": 0.60}
BETTER, WORSE = "v0002", "v0003"


def _val(auc: float) -> dict:
    return {"roc_auc": auc, "accuracy": auc, "f1": auc, "precision": auc, "recall": auc, "specificity": auc}


def trial_root(root: str, trial: int) -> str:
    return storage.join(root, f"t{trial:04d}")


def prepare(root: str, trials: int) -> None:
    torch.manual_seed(0)
    weights = TinyNet().state_dict()
    for trial in range(trials):
        reg = trial_root(root, trial)
        for version, auc in SCORES.items():
            assert registry.register(reg, MODEL, weights, {"metrics": {"val": _val(auc)}}) == version
        registry.set_alias(reg, MODEL, registry.CHAMPION, "v0001")


def _promote(reg: str, version: str, api: str) -> tuple[bool, str, str | None]:
    """(told it is champion, the reason given, the version it was last compared with)."""
    val = _val(SCORES[version])
    if api == "old":
        current = registry.get_alias(reg, MODEL, registry.CHAMPION)
        champion_val = None if current is None else registry.load_card(reg, MODEL, current)["metrics"]["val"]
        comparison = registry.compare("roc_auc", val, current, champion_val)
        told = registry.promote_if_better(reg, MODEL, version, comparison)
        return told, comparison["reason"], comparison["champion_version"]
    from pneumo import promotion  # not in the old code

    outcome = promotion.promote(reg, MODEL, version, val, "roc_auc")
    return outcome.is_champion, outcome.reason, outcome.champion_version


def _worker(root: str, trials: int, version: str, api: str, barrier, results) -> None:
    rng = random.Random(version)
    for trial in range(trials):
        barrier.wait(timeout=120)
        time.sleep(rng.random() * 0.002)  # vary the interleaving a little
        results.put((trial, version, *_promote(trial_root(root, trial), version, api)))


def run(root: str, trials: int, api: str = "new") -> dict:
    """Race ``trials`` times; the counts and, per trial, the champion and what each worker was told."""
    prepare(root, trials)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(root, trials, v, api, barrier, results)) for v in (BETTER, WORSE)]
    for worker in workers:
        worker.start()
    told: dict[int, dict[str, tuple[bool, str, str | None]]] = {}
    for _ in range(2 * trials):
        trial, version, *outcome = results.get(timeout=300)
        told.setdefault(trial, {})[version] = tuple(outcome)
    for worker in workers:
        worker.join(timeout=60)
        if worker.exitcode != 0:
            raise RuntimeError(f"a promoting worker failed with exit code {worker.exitcode}")
    trials_out = []
    for trial in range(trials):
        champion = json.loads(storage.read_bytes(
            storage.join(trial_root(root, trial), MODEL, "aliases", "champion.json")
        ))["version"]
        trials_out.append({"trial": trial, "champion": champion, "told": told[trial]})
    def lost(t: dict) -> bool:
        # Told "champion", yet the champion is the other one, which never compared itself with it:
        # a promotion silently overwritten.
        other = {BETTER: WORSE, WORSE: BETTER}
        return any(
            t["told"][v][0] and t["champion"] == other[v] and t["told"][other[v]][2] != v for v in (BETTER, WORSE)
        )

    return {
        "trials": trials,
        "lost_promotion": sum(lost(t) for t in trials_out),
        "wrong_champion": sum(t["champion"] != BETTER for t in trials_out),
        "both_told_promoted": sum(t["told"][BETTER][0] and t["told"][WORSE][0] for t in trials_out),
        "results": trials_out,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default=None, help="root of the trial registries (default: a temp dir)")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--api", choices=("new", "old"), default="new")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="promotion-race-") as tmp:
        started = time.monotonic()
        report = run(args.registry or tmp, args.trials, args.api)
    print(
        f"api={args.api} registry={'s3' if args.registry and storage.is_s3(args.registry) else 'local'} "
        f"trials={report['trials']}: wrong champion {report['wrong_champion']}/{report['trials']}, "
        f"both told 'promoted' {report['both_told_promoted']}/{report['trials']}, "
        f"promotion silently overwritten {report['lost_promotion']}/{report['trials']} "
        f"({time.monotonic() - started:.1f}s)"
    )
