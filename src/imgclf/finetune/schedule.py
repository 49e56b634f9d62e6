"""Learning-rate schedules as per-step factors of the peak rate."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from imgclf.config import FinetuneConfig

log = logging.getLogger("imgclf")


def lr_factor(cfg: FinetuneConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Factor of the peak rate at optimiser step ``step`` (for ``torch.optim.lr_scheduler.LambdaLR``).

    cosine: linear warm-up over ``warmup_epochs`` (at most half the steps, so that the rate also decays;
    longer is shortened, with a warning), then half a cosine from the peak towards 0, which it would reach
    one step after the last; step: the tutorial's decay, x ``step_gamma`` every ``step_epochs`` epochs.
    """
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "cosine" and warm > total // 2:
        log.info(
            "note: a warm-up of %g epoch(s) in a run of %d would leave the learning rate no time to decay: it takes "
            "%d of the %d steps (half the run)",
            cfg.warmup_epochs,
            cfg.epochs,
            total // 2,
            total,
        )
        warm = total // 2

    def cosine(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    def step_decay(step: int) -> float:
        return cfg.step_gamma ** (step // (cfg.step_epochs * steps_per_epoch))

    return cosine if cfg.schedule == "cosine" else step_decay
