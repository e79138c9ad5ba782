import contextlib

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pneumo.config import TrainConfig, seed_train
from pneumo.model import TinyNet
from pneumo.model import predict_proba
from pneumo.train import LOSSES, _batches, _class_weights, _FusedAdam, _Rows, _train_epoch, downsample, hinge_loss, train


def _separable(n: int, seed: int, positive_share: float = 0.7):
    """Two Gaussian clouds over 140 features, apart along 10 of them."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < positive_share).astype(np.uint8)
    X = rng.normal(0.5, 0.15, size=(n, 140)).astype(np.float32)
    X[:, :10] += 0.25 * y[:, None]
    return X, y


def test_hinge_loss_matches_keras_by_hand():
    prob = torch.tensor([0.9, 0.2, 0.6])
    y = torch.tensor([1.0, 0.0, 0.0])
    # Labels become +1, -1, -1: max(0, 1 - 0.9), max(0, 1 + 0.2), max(0, 1 + 0.6).
    assert hinge_loss(prob, y).item() == pytest.approx((0.1 + 1.2 + 1.6) / 3)
    weighted = hinge_loss(prob, y, torch.tensor([2.0, 1.0, 0.5]))
    assert weighted.item() == pytest.approx((0.2 + 1.2 + 0.8) / 3)


# The seed's lr (5e-5) needs hundreds of epochs; tests use a larger one to stay fast.
FAST = {"lr": 1e-3}


def test_learns_separable_data():
    X, y = _separable(600, seed=1)
    vX, vy = _separable(200, seed=2)
    tX, ty = _separable(300, seed=3)
    result = train(X, y, vX, vy, seed_train(epochs=30, patience=30, **FAST))
    assert roc_auc_score(ty, predict_proba(result.state_dict, tX)) > 0.95
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]


def test_same_seed_gives_identical_weights():
    X, y = _separable(200, seed=1)
    vX, vy = _separable(60, seed=2)
    config = seed_train(epochs=5, seed=7)
    first, second = train(X, y, vX, vy, config), train(X, y, vX, vy, config)
    assert first.state_dict.keys() == second.state_dict.keys()
    for key in first.state_dict:
        assert torch.equal(first.state_dict[key], second.state_dict[key]), key
    assert first.history == second.history
    other = train(X, y, vX, vy, config.model_copy(update={"seed": 8}))
    assert not torch.equal(other.state_dict["hidden1.weight"], first.state_dict["hidden1.weight"])


def test_early_stopping_restores_the_best_epoch():
    X, y = _separable(200, seed=1)
    # Validation labels are the opposite of the truth: learning makes the validation loss worse.
    vX, vy = _separable(100, seed=2)
    vy = 1 - vy
    seen = []
    result = train(X, y, vX, vy, seed_train(epochs=200, patience=3, **FAST), progress=seen.append)
    assert result.stopped_early
    assert len(result.history) == result.best_epoch + 3 < 200
    assert seen == result.history
    losses = [entry["val_loss"] for entry in result.history]
    assert result.best_epoch == 1 + int(np.argmin(losses))
    # The returned weights are those of the best epoch, not the last one.
    prob = torch.from_numpy(predict_proba(result.state_dict, vX))
    weights = torch.from_numpy(_class_weights(vy))
    assert hinge_loss(prob, torch.from_numpy(vy.astype(np.float32)), weights).item() == pytest.approx(min(losses), rel=1e-5)


@pytest.mark.parametrize("balance, expected_rows", [("downsample", 2 * 60), ("class_weights", 200), ("none", 200)])
def test_balance_modes(balance, expected_rows):
    X, y = _separable(200, seed=1)
    y[:] = 1
    y[:60] = 0
    vX, vy = _separable(50, seed=2)
    result = train(X, y, vX, vy, seed_train(epochs=2, balance=balance))
    assert result.n_train == expected_rows


def test_downsample_keeps_every_minority_row():
    y = np.array([1] * 30 + [0] * 8)
    rng = np.random.default_rng(0)
    keep = downsample(y, rng)
    assert np.bincount(y[keep]).tolist() == [8, 8]
    assert set(np.flatnonzero(y == 0)) <= set(keep)
    assert np.array_equal(keep, downsample(y, np.random.default_rng(0)))
    assert not np.array_equal(keep, downsample(y, np.random.default_rng(1)))


def test_class_weights_give_each_class_the_same_total():
    y = np.array([1] * 30 + [0] * 10)
    weights = _class_weights(y)
    assert weights[y == 0].sum() == pytest.approx(weights[y == 1].sum())
    assert weights.mean() == pytest.approx(1.0)


@pytest.mark.parametrize("n", [1, 31, 32, 33, 65, 100])
def test_batches_cover_every_row_once_and_never_hold_a_single_row(n):
    order, ends = _batches(n, 32, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(n)) and ends[-1] == n
    sizes = np.diff(ends, prepend=0)
    assert sizes.min() >= 1 and sizes.max() <= 33
    if n > 1:
        assert sizes.min() >= 2


@pytest.mark.parametrize("loss, weight_decay, balanced", [("hinge", 0.0, False), ("bce", 1e-4, True)])
def test_an_epoch_gives_the_weights_and_loss_of_the_plain_torch_loop(loss, weight_decay, balanced):
    """_train_epoch's shortcuts (one gather per epoch, training_forward, autograd.grad, the functional fused
    Adam, the aten BCE, losses read at the end) change no number: the seed's Adam and hinge loss, and the
    robust recipes' AdamW and weighted BCE, against the textbook loop bit for bit over three epochs."""
    X, y = _separable(301, seed=1)  # 301: the last batch of one row is merged
    y = y.astype(np.float32)
    weights = _class_weights(y) if balanced else None
    config = seed_train(loss=loss, weight_decay=weight_decay, batch_size=30, lr=1e-3)
    torch.manual_seed(0)
    fast, plain = TinyNet(), TinyNet()
    plain.load_state_dict(fast.state_dict())
    fast_adam = _FusedAdam(fast.parameters(), config)
    kind = torch.optim.AdamW if weight_decay else torch.optim.Adam
    plain_adam = kind(plain.parameters(), lr=config.lr, weight_decay=weight_decay, fused=True)
    tX, ty, tw = torch.from_numpy(X), torch.from_numpy(y), None if weights is None else torch.from_numpy(weights)
    reference = torch.nn.functional.binary_cross_entropy if loss == "bce" else hinge_loss
    fast_rng, plain_rng = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(3):
        got = _train_epoch(fast, fast_adam, LOSSES[loss], _Rows(X, y, weights), config.batch_size, fast_rng)
        plain.train()
        order, ends = _batches(len(y), config.batch_size, plain_rng)
        total = 0.0
        for index in np.split(order, ends[:-1]):
            idx = torch.from_numpy(index)
            batch_loss = reference(plain(tX[idx]), ty[idx], None if tw is None else tw[idx])
            plain_adam.zero_grad()
            batch_loss.backward()
            plain_adam.step()
            total += batch_loss.item() * len(index)
        assert got == total / len(y)
        for key, value in plain.state_dict().items():
            assert torch.equal(fast.state_dict()[key], value), key


def test_bce_loss_also_learns():
    X, y = _separable(400, seed=1)
    vX, vy = _separable(200, seed=2)
    result = train(X, y, vX, vy, seed_train(epochs=20, loss="bce", **FAST))
    assert result.history[-1]["val_auc"] > 0.9


def _flags() -> tuple:
    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())


@pytest.mark.parametrize("before", [False, "warn only"])
def test_training_runs_deterministic_kernels_and_restores_the_global_torch_settings(before):
    # torch's own setter, as pneumo.train calls it: torch.use_deterministic_algorithms imports torch._inductor (~2 s).
    torch._C._set_deterministic_algorithms(bool(before), warn_only=before == "warn only")
    flags = _flags()
    during = []
    X, y = _separable(100, seed=1)
    try:
        train(X, y, X, y, seed_train(epochs=2), progress=lambda entry: during.append(_flags()))
        assert [flag[1:] for flag in during] == [(True, False)] * 2  # erroring on a nondeterministic kernel
        assert _flags() == flags
    finally:
        torch._C._set_deterministic_algorithms(False)


def test_bad_input_is_refused():
    X, y = _separable(50, seed=1)
    config = seed_train(epochs=1)
    with pytest.raises(ValueError, match="labels must be 0"):
        train(X, y + 1, X, y, config)
    with pytest.raises(ValueError, match="single class"):
        train(X, np.ones_like(y), X, y, config)
    with pytest.raises(ValueError, match="features"):
        train(X, y, X[:, :10], y, config)
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        train(bad, y, X, y, config)
    with pytest.raises(ValueError, match="shape"):
        train(X, y[:-1], X, y, config)


def test_predict_proba_leaves_a_model_in_its_mode():
    X, y = _separable(100, seed=1)
    model = TinyNet().train()
    prob = predict_proba(model, X)
    assert prob.shape == (100,) and model.training
    assert np.array_equal(prob, predict_proba(model.state_dict(), X))


def test_weight_averaging_runs_the_budget_averages_and_re_estimates_batchnorm_on_train():
    X, y = _separable(400, seed=1)
    vX, vy = _separable(100, seed=2)
    vy = 1 - vy  # a validation loss that only gets worse: early stopping would stop at once
    config = seed_train(epochs=12, patience=2, swa_start=5, loss="bce", balance="class_weights", **FAST)
    result = train(X, y, vX, vy, config)
    assert len(result.history) == 12 and not result.stopped_early
    assert (result.averaged_from, result.best_epoch) == (5, 12)
    model = TinyNet()
    model.load_state_dict(result.state_dict)
    # BatchNorm's statistics are those of every training row under the averaged weights.
    with torch.no_grad():
        first = model.act1(model.hidden1(torch.from_numpy(X)))
    torch.testing.assert_close(model.norm1.running_mean, first.mean(axis=0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.norm1.running_var, first.var(axis=0), rtol=1e-4, atol=1e-5)
    # Not the last epoch's weights: the last epoch alone (swa_start = epochs) gives other ones.
    last = train(X, y, vX, vy, config.model_copy(update={"swa_start": 12}))
    assert last.averaged_from == 12
    assert not torch.allclose(last.state_dict["hidden1.weight"], result.state_dict["hidden1.weight"])
    # A budget shorter than swa_start averages its last epoch instead of failing.
    assert train(X, y, vX, vy, config.model_copy(update={"epochs": 3})).averaged_from == 3


def test_training_does_not_fill_new_tensors_and_gives_the_same_weights(monkeypatch):
    """Deterministic mode fills every new tensor with NaN by default, ~50 fills per step of TinyNet: training
    turns that off inside its settings (and restores it), and the weights are those of a run with the fills."""
    from pneumo import train as module

    X, y = _separable(300, seed=1)
    vX, vy = _separable(60, seed=2)
    config = seed_train(epochs=3, seed=5)
    seen = []
    before = torch.utils.deterministic.fill_uninitialized_memory
    without = train(X, y, vX, vy, config, progress=lambda entry: seen.append(torch.utils.deterministic.fill_uninitialized_memory))
    assert seen == [False] * 3 and torch.utils.deterministic.fill_uninitialized_memory == before

    original = module._torch_settings

    @contextlib.contextmanager
    def filling(threads):
        with original(threads):
            torch.utils.deterministic.fill_uninitialized_memory = True  # as before the change
            yield

    monkeypatch.setattr(module, "_torch_settings", filling)
    with_fills = train(X, y, vX, vy, config, progress=lambda entry: seen.append(torch.utils.deterministic.fill_uninitialized_memory))
    assert seen[3:] == [True] * 3
    for key in without.state_dict:
        assert torch.equal(without.state_dict[key], with_fills.state_dict[key]), key
    assert without.history == with_fills.history
