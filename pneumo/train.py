"""Train TinyNet: the seed's loss, optimizer and batch size, plus early stopping or weight averaging.

With ``swa_start`` set, training runs the whole epoch budget and the saved model is the
average of the weights at the end of every epoch from ``swa_start`` on (stochastic weight
averaging, ``torch.optim.swa_utils``), its BatchNorm statistics then re-estimated on all
training rows: an average of nearby solutions sits in a flatter part of the loss and holds
up better on films unlike train than any single epoch picked on val. It is still one TinyNet.

The whole training set is a few thousand rows of 140 floats, so it lives in memory as
one tensor and batches are plain index slices: a DataLoader would cost more than the
model's own forward and backward passes.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.utils.class_weight import compute_class_weight

from pneumo.config import TrainConfig
from pneumo.model import TinyNet

# One thread measured fastest for this model on a 2-core CPU (the matrices are 32 x 140 at most,
# too small to split), and it leaves the other cores to parallel tasks.
TRAIN_THREADS = 1


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]  # weights of the epoch with the lowest validation loss, or the average
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, train_loss, val_loss, val_auc
    best_epoch: int = 0  # 1-based; with weight averaging the last epoch averaged
    averaged_from: int = 0  # first epoch in the weight average; 0 = no averaging
    stopped_early: bool = False
    n_train: int = 0  # training rows after class balancing
    seconds: float = 0.0


def hinge_loss(prob: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Keras ``Hinge`` on the sigmoid output, labels 0/1 mapped to -1/+1: mean(max(0, 1 - y*p))."""
    per_sample = torch.clamp(1.0 - (2.0 * y - 1.0) * prob, min=0.0)
    if weight is not None:
        per_sample = per_sample * weight
    return per_sample.mean()


def bce_loss(prob: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    # The op F.binary_cross_entropy calls, without its argument checks and weight broadcast (as costly as
    # the op for 128 rows); the caller's shapes are equal. 1 is at::Reduction::Mean, F's "mean".
    return torch.ops.aten.binary_cross_entropy(prob, y, weight, 1)


LOSSES = {"hinge": hinge_loss, "bce": bce_loss}


def _check_xy(X: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y).ravel()
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"{name}: expected X of shape (n, features) and n labels, got X {X.shape} and {len(y)} labels")
    if len(y) < 2:
        raise ValueError(f"{name}: needs at least 2 rows, got {len(y)}")
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise ValueError(f"{name}: labels must be 0 (NORMAL) or 1 (PNEUMONIA), got {sorted(set(np.unique(y).tolist()))}")
    if not np.isfinite(X).all():
        raise ValueError(f"{name}: features contain NaN or infinite values")
    return X, y.astype(np.float32)


def downsample(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices keeping every minority row and as many randomly drawn majority rows."""
    counts = np.bincount(y.astype(int), minlength=2)
    minority = int(np.argmin(counts))
    keep_majority = rng.choice(np.flatnonzero(y != minority), size=counts[minority], replace=False)
    return np.sort(np.concatenate([np.flatnonzero(y == minority), keep_majority]))


def _class_weights(y: np.ndarray) -> np.ndarray:
    """Per-sample weights inversely proportional to class frequency (sklearn's "balanced")."""
    classes = np.array([0, 1])
    weights = compute_class_weight("balanced", classes=classes, y=y.astype(int))
    return weights[y.astype(int)].astype(np.float32)


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """A shuffled order of the n rows and the end of each batch in it. A last batch of one row is
    merged into the one before it: BatchNorm cannot normalise a single row in training, and no row
    should be skipped."""
    order = rng.permutation(n)
    ends = list(range(batch_size, n, batch_size)) + [n]
    if len(ends) > 1 and ends[-1] - ends[-2] == 1:
        del ends[-2]
    return order, ends


@contextlib.contextmanager
def _torch_settings(threads: int) -> Iterator[None]:
    """Deterministic kernels and a fixed thread count for the run, restored afterwards."""
    old_threads = torch.get_num_threads()
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    old_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.set_num_threads(threads)
    # The flag itself: torch.use_deterministic_algorithms also imports torch._inductor to set its compile
    # option (~1.8 s of CPU in every training process), and nothing here is compiled.
    torch._C._set_deterministic_algorithms(True)
    # Deterministic mode also fills every new tensor with NaN (~50 fills per step of this tiny model, ~7 % of
    # a step's op time); no kernel reads memory it has not written, so the weights are the same without.
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch._C._set_deterministic_algorithms(old_deterministic, warn_only=old_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


def train(
    train_X: np.ndarray,
    train_y: np.ndarray,
    val_X: np.ndarray,
    val_y: np.ndarray,
    config: TrainConfig,
    *,
    progress: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train a TinyNet and return the weights of its best validation-loss epoch (or their average, see above).

    Same inputs and seed give the same weights. The validation loss uses the same class
    weighting as training (balanced unless ``balance="none"``), so early stopping judges
    the objective the model is trained for, not the validation set's class mix.
    ``progress`` is called with each epoch's history entry.
    """
    train_X, train_y, val_X, val_y = _checked_inputs(train_X, train_y, val_X, val_y)
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    if config.balance == "downsample":
        keep = downsample(train_y, rng)
        train_X, train_y = train_X[keep], train_y[keep]

    balanced = config.balance != "none"
    rows = _Rows(train_X, train_y, _class_weights(train_y) if config.balance == "class_weights" else None)
    val_w = torch.from_numpy(_class_weights(val_y)) if balanced and len(np.unique(val_y)) == 2 else None
    loss_fn = LOSSES[config.loss]
    vX, vy = torch.from_numpy(val_X), torch.from_numpy(val_y)
    result = TrainResult(state_dict={}, n_train=rows.n)

    with _torch_settings(TRAIN_THREADS):
        torch.manual_seed(config.seed)
        model = TinyNet(n_features=train_X.shape[1])
        optimizer = _FusedAdam(model.parameters(), config)
        averaged = torch.optim.swa_utils.AveragedModel(model) if config.swa_start else None
        best = _BestEpoch(config.patience)
        for epoch in range(1, config.epochs + 1):
            train_loss = _train_epoch(model, optimizer, loss_fn, rows, config.batch_size, rng)
            val_loss, val_auc = _validate(model, loss_fn, vX, vy, val_w)
            entry = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_auc": val_auc}
            result.history.append(entry)
            if progress is not None:
                progress(entry)
            if averaged is not None:  # a fixed budget: no early stopping, no best epoch
                _average(averaged, model, epoch, config, result)
            elif best.stop_after(epoch, val_loss, model, result):
                result.stopped_early = epoch < config.epochs
                break

        if averaged is not None and result.averaged_from:
            # The averaged weights never ran with the running statistics of any epoch: one
            # forward pass over every training row gives them their own (update_bn).
            torch.optim.swa_utils.update_bn([torch.from_numpy(train_X)], averaged)
            result.state_dict = copy.deepcopy(averaged.module.state_dict())

    if not result.state_dict:
        raise RuntimeError(f"the validation loss was never finite in {len(result.history)} epochs; check the features")
    result.seconds = time.perf_counter() - started
    return result


def _checked_inputs(
    train_X: np.ndarray, train_y: np.ndarray, val_X: np.ndarray, val_y: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    train_X, train_y = _check_xy(train_X, train_y, "train")
    val_X, val_y = _check_xy(val_X, val_y, "val")
    if train_X.shape[1] != val_X.shape[1]:
        raise ValueError(f"train has {train_X.shape[1]} features but val has {val_X.shape[1]}")
    if len(np.unique(train_y)) < 2:
        raise ValueError("train holds a single class; TinyNet needs NORMAL and PNEUMONIA examples")
    return train_X, train_y, val_X, val_y


class _FusedAdam:
    """torch.optim.Adam (AdamW with weight decay) with ``fused=True``: the same fused kernel, called directly with
    the same arguments, so the same numbers (tests/code/test_train.py holds them to torch.optim's bit for bit).
    Without the Optimizer's per-step bookkeeping (hooks, profiler ranges, state look-ups, grouping by device)
    and with one step count for all ten tensors instead of ten (torch adds 1 to each, ~0.09 ms): ~0.3 ms of a
    1.7 ms step for this 2,541-parameter net. (The fused kernel is ~40% faster on CPU than the default one.)"""

    def __init__(self, params: Iterator[torch.nn.Parameter], config: TrainConfig) -> None:
        self.params = list(params)
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        self.count = torch.zeros((), dtype=torch.float32)  # the step number, a float32 tensor as the fused Adam keeps it
        # AdamW when decaying; the seed's plain Adam has no weight decay. Adam's default betas and eps.
        self.kernel = torch._fused_adamw_ if config.weight_decay else torch._fused_adam_
        self.options = {"lr": config.lr, "weight_decay": config.weight_decay, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
                        "amsgrad": False, "maximize": False}

    def step(self, grads: tuple[torch.Tensor, ...]) -> None:
        self.count.add_(1)
        self.kernel(self.params, list(grads), self.exp_avgs, self.exp_avg_sqs, [], [self.count] * len(self.params), **self.options)


def _train_epoch(
    model: TinyNet,
    optimizer: _FusedAdam,
    loss_fn: Callable[..., torch.Tensor],
    rows: "_Rows",
    batch_size: int,
    rng: np.random.Generator,
) -> float:
    """One pass over the training rows in shuffled batches; the mean training loss.

    Per step only what changes the weights: the rows are put in the epoch's order once and each batch is a
    slice of them (the same rows a gather per batch gives), the gradients come from autograd.grad (no
    .grad to clear) and the losses are read once at the end (no .item() per step)."""
    model.train()
    order, ends = _batches(rows.n, batch_size, rng)
    X, y, weights = rows.shuffled(order)
    losses, start = [], 0
    for end in ends:
        loss = loss_fn(model.training_forward(X[start:end]), y[start:end], None if weights is None else weights[start:end])
        optimizer.step(torch.autograd.grad(loss, optimizer.params))
        losses.append(loss.detach())
        start = end
    sizes = np.diff(ends, prepend=0).tolist()
    # Summed as a float64 loop over loss.item() * len(batch) sums them: the same figure as before.
    return sum(value * size for value, size in zip(torch.stack(losses).tolist(), sizes)) / rows.n


class _Rows:
    """The training rows, labels and weights, put in an epoch's order into buffers made once (a fresh
    108 MB array per epoch would cost page faults: ~4x the gather)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None) -> None:
        self.sources = [X, y] + ([] if weights is None else [weights])
        self.buffers = [np.empty_like(a) for a in self.sources]
        self.n = len(y)

    def shuffled(self, order: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        for source, buffer in zip(self.sources, self.buffers):
            np.take(source, order, axis=0, out=buffer)
        X, y, *weights = (torch.from_numpy(b) for b in self.buffers)
        return X, y, (weights[0] if weights else None)


def _validate(
    model: TinyNet, loss_fn: Callable[..., torch.Tensor], vX: torch.Tensor, vy: torch.Tensor, weights: torch.Tensor | None
) -> tuple[float, float | None]:
    """The validation loss, and the validation AUC when val holds both classes."""
    model.eval()
    with torch.no_grad():
        val_prob = model(vX)
        val_loss = loss_fn(val_prob, vy, weights).item()
    val_y = vy.numpy()
    val_auc = float(roc_auc_score(val_y, val_prob.numpy())) if len(np.unique(val_y)) == 2 else None
    return val_loss, val_auc


def _average(
    averaged: torch.optim.swa_utils.AveragedModel, model: TinyNet, epoch: int, config: TrainConfig, result: TrainResult
) -> None:
    """Add this epoch's weights to the average from ``swa_start`` on (the last epoch at least)."""
    if epoch >= min(config.swa_start, config.epochs):
        averaged.update_parameters(model)
        result.averaged_from = result.averaged_from or epoch
        result.best_epoch = epoch


class _BestEpoch:
    """Early stopping: keeps the weights of the lowest validation loss, stops after ``patience`` epochs without one."""

    def __init__(self, patience: int) -> None:
        self.patience, self.best_loss, self.since_best = patience, float("inf"), 0

    def stop_after(self, epoch: int, val_loss: float, model: TinyNet, result: TrainResult) -> bool:
        if val_loss < self.best_loss:
            self.best_loss, self.since_best = val_loss, 0
            result.best_epoch = epoch
            result.state_dict = copy.deepcopy(model.state_dict())
            return False
        self.since_best += 1
        return self.since_best >= self.patience
