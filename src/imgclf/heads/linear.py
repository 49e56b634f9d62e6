"""The deployed form of every head: ``softmax(normalise(x) @ W.T + b)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import nn


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (an all-zero row stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of scores (n, k): probabilities that sum to 1 per row."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class LinearHead:
    """A linear layer over (optionally L2-normalised) features, with softmax scores."""

    weight: np.ndarray  # (n_classes, n_features)
    bias: np.ndarray  # (n_classes,)
    l2_normalize: bool = True

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        if np.ndim(x) != 2 or np.shape(x)[1] != self.weight.shape[1]:
            raise ValueError(
                f"features of shape {np.shape(x)} given; this head takes (n, {self.weight.shape[1]}): "
                "features of another backbone or resolution?"
            )
        x = l2_normalize(x) if self.l2_normalize else x
        return x @ self.weight.T + self.bias

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (n, k), in the order of the weight's rows."""
        return softmax(self.decision_function(np.asarray(x, dtype=np.float64)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class indices (n,), rows of the weight (not labels: ``Bundle.classes`` names them)."""
        return np.argmax(self.decision_function(x), axis=1)

    def module(self) -> nn.Module:
        """The head as a torch module returning probabilities (for export)."""
        from imgclf.heads.nets import TorchLinearHead

        return TorchLinearHead(self)
