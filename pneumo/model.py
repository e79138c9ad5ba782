"""TinyNet: the seed's 2,541-parameter Keras model, in PyTorch."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Keras BatchNormalization defaults. Keras keeps 0.99 of the old running statistic;
# PyTorch's `momentum` is the weight of the new batch, hence 1 - 0.99.
_BN = {"eps": 1e-3, "momentum": 0.01}


class TinyNet(nn.Module):
    """Linear-LeakyReLU-BatchNorm, Linear-tanh-BatchNorm, Linear-sigmoid.

    ``forward`` returns probabilities of PNEUMONIA with shape (n,), not logits.
    Initialisation follows Keras: he-uniform for the first layer, glorot-uniform for
    the others, zero biases. One known difference: in training, PyTorch's BatchNorm
    updates the running variance with the unbiased batch variance, Keras with the biased one.
    """

    def __init__(self, n_features: int = 140):
        super().__init__()
        self.hidden1 = nn.Linear(n_features, 16)
        self.act1 = nn.LeakyReLU(0.1)
        self.norm1 = nn.BatchNorm1d(16, **_BN)
        self.hidden2 = nn.Linear(16, 10)
        self.act2 = nn.Tanh()
        self.norm2 = nn.BatchNorm1d(10, **_BN)
        self.output = nn.Linear(10, 1)
        self._init_like_keras()

    def _init_like_keras(self) -> None:
        # kaiming_uniform_ with the ReLU gain has limit sqrt(6 / fan_in): Keras' he_uniform.
        nn.init.kaiming_uniform_(self.hidden1.weight, nonlinearity="relu")
        nn.init.xavier_uniform_(self.hidden2.weight)
        nn.init.xavier_uniform_(self.output.weight)
        for layer in (self.hidden1, self.hidden2, self.output):
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.act1(self.hidden1(x)))
        x = self.norm2(self.act2(self.hidden2(x)))
        return torch.sigmoid(self.output(x)).squeeze(1)

    def training_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` in training mode with each layer's function called directly: the same kernels and
        numbers (the batch statistics, running averages and batch counts too), without nn.Module's per-call
        overhead, ~0.1 ms of a 1.7 ms training step at this size (pneumo.train). Not for update_bn's
        cumulative averages (momentum None)."""
        x = _batch_norm(self.norm1, F.leaky_relu(F.linear(x, self.hidden1.weight, self.hidden1.bias), self.act1.negative_slope))
        x = _batch_norm(self.norm2, torch.tanh(F.linear(x, self.hidden2.weight, self.hidden2.bias)))
        return torch.sigmoid(F.linear(x, self.output.weight, self.output.bias)).squeeze(1)


def _batch_norm(norm: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """What ``norm(x)`` does in training mode with a fixed momentum."""
    norm.num_batches_tracked.add_(1)
    return torch.batch_norm(x, norm.weight, norm.bias, norm.running_mean, norm.running_var, True, norm.momentum, norm.eps, False)


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def keras_parameter_count(model: nn.Module) -> int:
    """Parameters as Keras' summary counts them: trainable ones plus BatchNorm running
    means and variances (Keras' "non-trainable params"). PyTorch's num_batches_tracked
    counter has no Keras counterpart and is left out."""
    running = sum(
        buffer.numel() for name, buffer in model.named_buffers() if name.endswith(("running_mean", "running_var"))
    )
    return trainable_parameter_count(model) + running


def predict_proba(model: TinyNet | dict[str, torch.Tensor], X: np.ndarray) -> np.ndarray:
    """PNEUMONIA probabilities (n,) of a model or a state_dict, computed in eval mode."""
    if isinstance(model, dict):
        state_dict = model
        model = TinyNet(n_features=state_dict["hidden1.weight"].shape[1])
        model.load_state_dict(state_dict)
    X = np.asarray(X, dtype=np.float32)
    was_training = model.training
    threads = torch.get_num_threads()
    model.eval()
    try:
        # One thread, as training uses: on a busy 2-core machine a pool round made 17 rows (a film and its
        # 16 views) take 206 ms instead of 9; the matrices are 16 x 140 at most per row.
        torch.set_num_threads(1)
        with torch.no_grad():
            return model(torch.from_numpy(X)).numpy()
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)
