"""Learning-rate schedules as per-step factors of the peak rate."""

from __future__ import annotations

import math
from collections.abc import Callable

from imgclf.config import FinetuneConfig


def lr_factor(cfg: FinetuneConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Factor of the peak rate at optimiser step ``step`` (for ``torch.optim.lr_scheduler.LambdaLR``).

    cosine: linear warm-up over ``warmup_epochs``, then half a cosine down to 0 at the last step;
    step: the tutorial's decay, x ``step_gamma`` every ``step_epochs`` epochs.
    """
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = round(cfg.warmup_epochs * steps_per_epoch)

    def cosine(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    def step_decay(step: int) -> float:
        return cfg.step_gamma ** (step // (cfg.step_epochs * steps_per_epoch))

    return cosine if cfg.schedule == "cosine" else step_decay
