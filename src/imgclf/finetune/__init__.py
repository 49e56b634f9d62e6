"""Fine-tuning the whole network: new last layer, end-to-end training, early stopping, checkpoints."""

from imgclf.finetune.trainer import FinetuneResult, finetune, split_validation

__all__ = ["FinetuneResult", "finetune", "split_validation"]
