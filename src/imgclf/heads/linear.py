"""The deployed form of every head: ``softmax(normalise(x) @ W.T + b)``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from imgclf.heads.svm import l2_normalize, softmax


@dataclass
class LinearHead:
    """A linear layer over (optionally L2-normalised) features, with softmax scores."""

    weight: np.ndarray  # (n_classes, n_features)
    bias: np.ndarray  # (n_classes,)
    l2_normalize: bool = True

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        x = l2_normalize(x) if self.l2_normalize else x
        return x @ self.weight.T + self.bias

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.decision_function(np.asarray(x, dtype=np.float64)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(self.decision_function(x), axis=1)

    def module(self) -> nn.Module:
        """The head as a torch module returning probabilities (for export)."""
        return TorchLinearHead(self)


class TorchLinearHead(nn.Module):
    def __init__(self, head: LinearHead) -> None:
        super().__init__()
        self.l2 = head.l2_normalize
        self.fc = nn.Linear(head.weight.shape[1], head.weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(torch.from_numpy(np.asarray(head.weight, np.float32)))
            self.fc.bias.copy_(torch.from_numpy(np.asarray(head.bias, np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.l2:
            x = nn.functional.normalize(x, dim=1, eps=1e-12)
        return torch.softmax(self.fc(x), dim=1)
