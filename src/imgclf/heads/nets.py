"""The linear head as a torch module (imported only for export and parity checks)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from imgclf.heads.linear import LinearHead


class TorchLinearHead(nn.Module):
    """Features -> (L2 normalisation) -> linear layer -> softmax."""

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
