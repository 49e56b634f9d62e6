"""``finetune``: a new last layer (dropout + linear) on a pretrained backbone, trained end to end.

Head-only warm-up, then the whole network with a lower backbone rate; early stopping and the best epoch
chosen on a validation part carved from the training split; a checkpoint every epoch for ``resume``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from imgclf.backbones import Backbone
from imgclf.config import Config, FinetuneConfig
from imgclf.data.dataset import Dataset
from imgclf.data.io import Preprocess
from imgclf.features.runtimes import resolve_device, resolve_precision
from imgclf.finetune.augment import Augment, Normalizer, to_device
from imgclf.finetune.imagecache import ImageCache, build_image_cache, whole_square
from imgclf.finetune.schedule import lr_factor
from imgclf.heads import LinearHead
from imgclf.utils import atomic_write_bytes, atomic_write_text, cpu_count, torch_threads_kept

log = logging.getLogger("imgclf")

LOG_FIELDS = ("epoch", "lr", "train_loss", "train_error", "val_loss", "val_error", "img_per_s", "seconds")
CKPT_NAME = "finetune_ckpt.pt"
LOG_NAME = "finetune_log.csv"
FEW_VALIDATION_IMAGES = 20  # fewer: one image moves the validation error by more than 5 points
RESUMABLE_CHANGES = ("resume", "compile")  # settings that change neither the schedule, the data order nor the numbers
EARLIER_VERSION = "made by an earlier version of imgclf"  # what a checkpoint of other settings' names is
STAGE_CONTAINERS = ("features", "trunk_output", "blocks", "encoder.layers", "layers")  # torchvision: stages inside
EpochHook = Callable[[int, dict[str, float]], None]
# a training step's peak memory: what autograd keeps of one image for the backward, times this, per image (measured
# 0.99-1.08 on the CPU: efficientnet_lite0 and lite2, 224 and 448 px, batches of 2-32), plus this many times the
# parameters' bytes (gradients, AdamW's two moments, the copies each checkpoint is written from; measured 9-12)
STEP_MEMORY_FACTOR = 1.1
STATE_COPIES = 12
FROZEN_COPIES = 3  # a frozen parameter has no gradient or moments: itself, and the copies a checkpoint is made of
CGROUP = Path("/sys/fs/cgroup")  # a container's own cgroup (v2): its memory limit, below the machine's
OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")  # PyTorch's (CUDA, MPS, CPU)


@dataclass
class FinetuneResult:
    """The fine-tuned backbone (eval mode, on CPU), its new last layer, the per-epoch log (from epoch 0, the
    linear probe, when it was validated) and figures."""

    backbone: Backbone
    head: LinearHead
    history: list[dict[str, float]]
    figures: dict[str, Path]
    kept_epoch: int
    skipped: dict[int, str] = field(default_factory=dict)  # sample index -> why it could not be used
    cpu_threads: int | None = None  # PyTorch's threads on the CPU (their number changes the last digits)

    def summary(self) -> dict[str, float | int | None]:
        """The kept epoch, the epochs trained, the kept epoch's validation error (None where not validated) and
        the CPU threads (None on a GPU), as metrics.json's ``finetune`` entry; empty where no epoch ran."""
        if not self.history:
            return {}
        error = next((h["val_error"] for h in self.history if h["epoch"] == self.kept_epoch), math.nan)
        return {
            "kept_epoch": self.kept_epoch,
            "epochs_trained": int(self.history[-1]["epoch"]),
            "kept_val_error": float(error) if math.isfinite(error) else None,
            "cpu_threads": self.cpu_threads,
        }


class Classifier(nn.Module):
    """Backbone features -> dropout -> linear layer."""

    def __init__(self, backbone: nn.Module, num_features: int, n_classes: int, dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(num_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.backbone(x)))


def split_validation(
    labels: np.ndarray, train_idx: np.ndarray, fraction: float, seed: int, groups: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded (fit, val) partition of ``train_idx``; each class keeps a fitting image.

    ``fraction`` of all the images are held out, shared among the classes by largest remainder, so that
    many small classes (three images each) still give a validation part, one image from some of them.
    With ``groups`` (one per image of the data set), whole groups are held out, shuffled, until a class's
    share is reached, and each class keeps a fitting group.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    classes, sizes = np.unique(labels[train_idx], return_counts=True)
    quota = sizes * fraction
    n_val = np.minimum(np.floor(quota).astype(int), sizes - 1)
    tie_break = np.random.default_rng([seed, 0x7A1]).permutation(len(classes))
    for k in sorted(range(len(classes)), key=lambda k: (-(quota[k] - np.floor(quota[k])), tie_break[k])):
        if n_val.sum() >= round(len(train_idx) * fraction):
            break
        n_val[k] += int(n_val[k] < sizes[k] - 1)
    val: list[np.ndarray] = []
    for c, n in zip(classes, n_val, strict=True):
        idx = np.sort(train_idx[labels[train_idx] == c])
        if groups is None:
            val.append(idx[rng.permutation(len(idx))[:n]])
            continue
        members: dict[str, list[int]] = {}
        for i in idx:
            members.setdefault(groups[i], []).append(int(i))
        names = sorted(members)
        held: list[int] = []
        for k in rng.permutation(len(names))[:-1]:
            if len(held) >= n:
                break
            held += members[names[k]]
        val.append(np.array(held, np.int64))
    val_idx = np.sort(np.concatenate(val)) if val else np.empty(0, np.int64)
    return np.setdiff1d(train_idx, val_idx), val_idx


def _param_groups(model: Classifier, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """Head and backbone groups (backbone at lr x backbone_lr_mult); no weight decay on biases and norms."""
    parts = [(model.fc, cfg.lr)]
    if not cfg.freeze_backbone:
        parts.append((model.backbone, cfg.lr * cfg.backbone_lr_mult))
    groups = []
    for module, lr in parts:
        params = [p for p in module.parameters() if p.requires_grad]
        groups += [
            {"params": [p for p in params if p.ndim > 1], "lr": lr, "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "lr": lr, "weight_decay": 0.0},
        ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: Classifier, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW or momentum SGD over the parameter groups of :func:`_param_groups`."""
    groups = _param_groups(model, cfg)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def settings_without_effect(cfg: FinetuneConfig) -> list[str]:
    """The settings changed from their default that others make void, each as ``name = value (why)``; a number
    set to 0 switches its part off (``--early-stopping 0`` with ``--val-fraction 0``) and is not named."""
    frozen = "--freeze-backbone trains the new last layer only"
    rules = [
        ("head_warmup_epochs", cfg.freeze_backbone, frozen),
        ("backbone_lr_mult", cfg.freeze_backbone, frozen),
        ("train_groups", cfg.freeze_backbone, frozen),
        ("drop_path", cfg.freeze_backbone, frozen),
        ("freeze_bn", cfg.freeze_backbone, frozen),
        ("probe_c", cfg.head_init == "random", "of --head-init linear_probe only"),
        ("early_stopping", cfg.val_fraction == 0, "no validation part with --val-fraction 0"),
        ("val_tolerance", cfg.val_fraction == 0, "no validation part with --val-fraction 0"),
        ("warmup_epochs", cfg.schedule == "step", "the warm-up is the cosine schedule's"),
        ("step_epochs", cfg.schedule == "cosine", "of --schedule step only"),
        ("step_gamma", cfg.schedule == "cosine", "of --schedule step only"),
        ("momentum", cfg.optimizer == "adamw", "of --optimizer sgd only"),
    ]
    default = FinetuneConfig()
    return [
        f"{name} = {getattr(cfg, name)} ({why})"
        for name, void, why in rules
        if void and getattr(cfg, name) != getattr(default, name) and not _switched_off(getattr(cfg, name))
    ]


def _switched_off(value: object) -> bool:
    return not isinstance(value, bool) and value == 0


def _identity(cfg: Config, backbone: Backbone, rels: list[str]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (settings, backbone, seed and training images): their
    digest, and the settings themselves, to say what differs."""
    ft = cfg.finetune.model_dump(mode="json", exclude=set(RESUMABLE_CHANGES))
    key = json.dumps([ft, backbone.spec(), cfg.output.seed, rels], sort_keys=True)
    settings = {
        **ft,
        "backbone": backbone.name,
        "weights": backbone.weights_id,
        **dataclasses.asdict(backbone.preprocess),
    }
    settings |= {"seed": cfg.output.seed, "training images": len(rels)}
    return {"fingerprint": hashlib.sha256(key.encode()).hexdigest()[:16], "settings": settings}


def load_checkpoint(
    cfg: Config, ds: Dataset, train_idx: np.ndarray, backbone: Backbone, run_dir: Path
) -> dict[str, Any] | None:
    """The checkpoint in ``run_dir`` that ``--resume`` continues (None without ``--resume`` or a checkpoint);
    ValueError if it cannot be read or belongs to another fine-tuning run (``train`` asks before it touches
    the run folder, so that a refusal leaves an earlier run whole)."""
    ckpt_path = Path(run_dir) / CKPT_NAME
    if not (cfg.finetune.resume and ckpt_path.exists()):
        return None
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as e:  # cut short or altered: nothing to resume from
        raise ValueError(f"{ckpt_path} cannot be read ({type(e).__name__}); run without --resume") from e
    identity = _identity(cfg, backbone, [ds.samples[i].rel for i in train_idx])
    if ckpt["fingerprint"] != identity["fingerprint"]:
        old = ckpt.get("settings")
        diff = _differences(old, identity["settings"]) if old else EARLIER_VERSION  # the first ones had none
        if diff == EARLIER_VERSION:
            raise ValueError(
                f"{ckpt_path} was made by an earlier version of imgclf, which this one cannot continue: run "
                "without --resume to fine-tune afresh"
            )
        raise ValueError(
            f"{ckpt_path} belongs to another fine-tuning run ({diff}): what it trained, and how, depends on "
            "them, so it cannot be continued; run without --resume to start afresh"
        )
    return ckpt


class CheckpointProgress(NamedTuple):
    """How far a checkpoint's fine-tuning got: the last epoch it holds, the epochs its run was set to (None where
    it does not say) and whether its training ended (the last epoch, early stopping, divergence)."""

    epoch: int
    epochs: int | None
    done: bool


def checkpoint_progress(path: Path) -> CheckpointProgress | None:
    """:class:`CheckpointProgress` of the checkpoint at ``path`` (its tensors memory-mapped, not read); None where
    it cannot be read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        epochs = (ckpt.get("settings") or {}).get("epochs")
        return CheckpointProgress(int(ckpt["epoch"]), int(epochs) if epochs is not None else None, bool(ckpt["done"]))
    except Exception:  # noqa: BLE001 - cut short, altered, another format: nothing to go on from
        return None


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``epochs 8 -> 12, lr 0.001 -> 0.002``; a change not among the settings is in the images' names; settings
    of other names (some recorded, some not) are those an earlier version of imgclf recorded."""
    if set(old) != set(new):
        return EARLIER_VERSION
    changed = [f"{k} {old.get(k)} -> {new.get(k)}" for k in new if old.get(k) != new.get(k)]
    return ", ".join(changed[:6]) if changed else "other training images, as many"


def _state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _prefetch(batches: list[np.ndarray], load: Callable[[np.ndarray], Any]) -> Iterator[Any]:
    """``load`` each batch of indices one step ahead, in a background thread."""
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(load, batches[0]) if batches else None
        for i in range(len(batches)):
            assert pending is not None
            item = pending.result()
            pending = pool.submit(load, batches[i + 1]) if i + 1 < len(batches) else None
            yield item


class CacheLoader:
    """Batches of (uint8 NHWC images, labels) from the image cache, on the training device."""

    def __init__(self, cache: ImageCache, rows: np.ndarray, labels: np.ndarray, device: torch.device) -> None:
        self.cache, self.rows, self.labels, self.device = cache, rows, labels, device

    def __call__(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        order = np.sort(batch)  # ascending rows read the memmap sequentially
        x = torch.from_numpy(np.ascontiguousarray(self.cache.images[self.rows[order]]))
        return to_device(x, self.device), to_device(torch.from_numpy(self.labels[order]), self.device)

    def epoch_batches(self, batch_size: int, gen: torch.Generator, balance: bool) -> list[np.ndarray]:
        n = len(self.rows)
        if balance:
            counts = np.bincount(self.labels)
            weights = torch.from_numpy(1.0 / counts[self.labels])
            order = torch.multinomial(weights, n, replacement=True, generator=gen).numpy()
        else:
            order = torch.randperm(n, generator=gen).numpy()
        batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        if len(batches) > 1 and len(batches[-1]) == 1:  # batch norm cannot train on a single image
            batches[-2:] = [np.concatenate(batches[-2:])]
        return [b for b in batches if len(b) > 1]

    def in_order(self, batch_size: int) -> list[np.ndarray]:
        n = len(self.rows)
        return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


class FinetuneMemoryError(MemoryError, ValueError):
    """A training step that does not fit in memory; the message names the setting to change (a ValueError, as a
    setting's error: the command line prints it without a traceback)."""


@dataclass(frozen=True)
class StepMemory:
    """The memory a training step of ``batch`` images needs, ``batch x per_image + fixed`` bytes, and what the
    training device has: ``available`` now, ``total`` (both None where unknown)."""

    per_image: int
    fixed: int
    resolution: int
    available: int | None
    total: int | None

    def need(self, batch: int) -> int:
        return batch * self.per_image + self.fixed

    def advice(self, batch: int) -> str:
        """The largest ``--ft-batch-size`` that fits in the memory available, else a ``--resolution`` that does;
        where ``batch`` was thought to fit (memory taken meanwhile, a limit unseen), to lower either."""
        room = max(0, (self.available or 0) - self.fixed)
        fits = room // self.per_image
        if fits >= batch:
            return f"lower --ft-batch-size (now {batch}) or --resolution"
        if fits >= 2:
            return f"--ft-batch-size {fits} fits (or lower --resolution)"
        if not room:  # the network and its training state alone: no image size helps
            return "the network itself does not fit: a smaller --backbone, or --freeze-backbone"
        side = int(self.resolution * math.sqrt(room / (2 * self.per_image))) // 32 * 32  # memory goes with pixels
        fits = f" (--resolution {side} fits with --ft-batch-size 2)" if side >= 32 else ""
        return f"even --ft-batch-size 2 does not fit: lower --resolution{fits}"


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _ram() -> tuple[int, int]:
    """(available, total) bytes of RAM, within a container's limit."""
    import psutil

    vm = psutil.virtual_memory()
    available, total = vm.available, vm.total
    with contextlib.suppress(OSError, KeyError, ValueError):  # no cgroup v2 limit here ("max": ValueError)
        limit = int((CGROUP / "memory.max").read_text())
        stat = dict(line.split() for line in (CGROUP / "memory.stat").read_text().splitlines())
        used = int((CGROUP / "memory.current").read_text()) - int(stat["inactive_file"])  # less what it can drop
        available, total = min(available, limit - used), min(total, limit)
    return available, total


def available_memory(device: torch.device) -> tuple[int, int] | tuple[None, None]:
    """(available, total) bytes where training runs: the GPU's free and total memory, or the RAM's; (None, None)
    where unknown (MPS)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    return _ram() if device.type == "cpu" else (None, None)


def step_memory(model: Classifier, resolution: int, bf16: bool, device: torch.device) -> StepMemory:
    """Estimate what a training step needs from one image's forward pass through the backbone (as it is, in eval
    mode: no random draw) at ``resolution``: the bytes autograd keeps for the backward, parameters not counted (a
    frozen part keeps none), x :data:`STEP_MEMORY_FACTOR` per image, plus :data:`STATE_COPIES` x the trainable
    parameters' bytes and :data:`FROZEN_COPIES` x the frozen ones'. On the CPU it came within 8 % of the measured
    peak resident memory (see docs/finetuning.md)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()  # each once: several operations keep the same tensor
        return t

    on = next(model.parameters()).device
    with (
        torch.autocast(on.type, dtype=torch.bfloat16, enabled=bf16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        model.backbone(torch.zeros(1, 3, resolution, resolution, device=on))
    per_image = max(1, round(sum(saved.values()) * STEP_MEMORY_FACTOR))  # a frozen backbone keeps nothing
    fixed = sum(  # a frozen part (--freeze-backbone) needs no gradients nor AdamW's moments
        (STATE_COPIES if p.requires_grad else FROZEN_COPIES) * p.numel() * p.element_size() for p in model.parameters()
    )
    return StepMemory(per_image, fixed, resolution, *available_memory(device))


def check_step_memory(mem: StepMemory, batch: int, warn: bool = True) -> None:
    """Warn where a training step of ``batch`` images needs more memory than is available (the run would end
    out of memory, on Linux killed without a word); refuse where it needs more than there is at all: closing
    other programs cannot make it fit, and the run would only end so after its images were decoded. ``warn``
    False: the refusal only."""
    if mem.available is None or mem.total is None:
        return
    need = mem.need(batch)
    text = f"a training step of {batch} images at {mem.resolution} px needs about {_gb(need)} of memory"
    log.debug("%s; %s available", text, _gb(mem.available))
    if need > mem.total:
        raise FinetuneMemoryError(f"{text}, more than the {_gb(mem.total)} there is: {mem.advice(batch)}")
    if warn and need > mem.available:
        log.warning(
            "warning: %s and %s is available: the run will likely end out of memory (on Linux killed without a "
            "message); %s, or close other programs",
            text,
            _gb(mem.available),
            mem.advice(batch),
        )


def _classifier(ft: FinetuneConfig, backbone: Backbone, n_classes: int) -> Classifier:
    """The network to fine-tune: ``backbone``'s, a new last layer, its lower parts frozen as ``ft`` says."""
    model = Classifier(backbone.model, backbone.num_features, n_classes, ft.dropout)
    if ft.freeze_backbone:
        model.backbone.requires_grad_(False)
    elif ft.train_groups:
        _freeze_lower_groups(model.backbone, ft.train_groups)
    return model


def _check_memory(model: Classifier, cfg: Config, backbone: Backbone, warn: bool = True) -> StepMemory:
    """:func:`check_step_memory` of ``model`` at the run's resolution, batch, device and precision; the estimate."""
    device = resolve_device(cfg.features.device)
    res = backbone.preprocess.resolution
    use_bf16 = resolve_precision(cfg.features.precision, "torch", device.type) == "bf16"
    try:
        mem = step_memory(model, res, use_bf16, device)
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        raise FinetuneMemoryError(f"out of memory for one image at {res} px: lower --resolution") from e
    check_step_memory(mem, cfg.finetune.ft_batch_size, warn)
    return mem


def check_memory_ahead(cfg: Config, backbone: Backbone, n_classes: int) -> None:
    """The refusal of :func:`check_step_memory` for the network :func:`finetune` would train, before a run folder
    is touched (an earlier run there stays whole; the warning is :func:`finetune`'s, once); ``backbone`` and the
    random generators are left as they were."""
    flags = [p.requires_grad for p in backbone.model.parameters()]
    try:
        with _seeded_global_rngs(cfg.output.seed):  # the new layer's draws: the caller's states given back
            _check_memory(_classifier(cfg.finetune, backbone, n_classes), cfg, backbone, warn=False)
    finally:
        for p, flag in zip(backbone.model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def _out_of_memory(e: BaseException) -> bool:
    """Python's MemoryError, or PyTorch's out-of-memory error (torch.OutOfMemoryError on CUDA, a RuntimeError on
    the CPU and MPS)."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(s in str(e) for s in OUT_OF_MEMORY))


def _duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``1 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _write_log(path: Path, history: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in LOG_FIELDS})
    atomic_write_text(path, buf.getvalue(), parents=False)  # a run folder removed meanwhile is not made again


def _plot(path: Path, history: list[dict[str, float]], best_epoch: int) -> Path:
    from matplotlib.figure import Figure  # not pyplot: the caller's backend (a notebook's) stays as it is
    from matplotlib.ticker import MaxNLocator

    ep = [h["epoch"] for h in history]
    validated = any(np.isfinite(h["val_error"]) for h in history)
    fig = Figure(figsize=(10, 3.8))
    ax_loss, ax_err = fig.subplots(1, 2)
    # both losses are the plain cross-entropy (no label smoothing); the training one is averaged over the
    # epoch's augmented batches, in training mode (dropout on), while the weights change
    ax_loss.plot(ep, [h["train_loss"] for h in history], "o-", label="training (augmented, during the epoch)")
    ax_err.plot(ep, [h["train_error"] for h in history], "o-", label="training (augmented, during the epoch)")
    if validated:
        ax_loss.plot(ep, [h["val_loss"] for h in history], "s-", label="validation (after the epoch)")
        ax_err.plot(ep, [h["val_error"] for h in history], "s-", label="validation (after the epoch)")
    ax_err.axvline(best_epoch, color="gray", ls=":", label=f"{'best' if validated else 'kept'} epoch ({best_epoch})")
    xlabel = "epoch (0: the linear probe)" if ep[0] == 0 else "epoch"
    ax_loss.set(xlabel=xlabel, ylabel="cross-entropy", title="Loss")
    ax_err.set(xlabel=xlabel, ylabel="error rate", title="Error" + ("" if validated else " (no validation part)"))
    ax_err.set_ylim(bottom=0)
    for ax in (ax_loss, ax_err):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue(), parents=False)
    return path


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    state = {"gen": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(gen: torch.Generator, state: dict[str, Any]) -> None:
    gen.set_state(state["gen"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed torch's and NumPy's global generators (dropout, drop path and the new layer's first draw use
    them) for the run, and give the caller's states back afterwards."""
    saved: list[tuple[Callable[[Any], object], Any]] = [
        (np.random.set_state, np.random.get_state()),
        (torch.set_rng_state, torch.get_rng_state()),
    ]
    if torch.cuda.is_available():
        saved.append((torch.cuda.set_rng_state_all, torch.cuda.get_rng_state_all()))
    if torch.backends.mps.is_available():
        saved.append((torch.mps.set_rng_state, torch.mps.get_rng_state()))
    torch.manual_seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        for restore, state in saved:
            restore(state)


def _save_ckpt(path: Path, ckpt: dict[str, Any]) -> None:
    """Write a checkpoint atomically, made in memory first: a full disk is an OSError naming it."""
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(path, buf.getvalue(), parents=False)


@torch_threads_kept()
def finetune(
    cfg: Config,
    ds: Dataset,
    train_idx: np.ndarray,
    backbone: Backbone,
    run_dir: Path,
    on_epoch_end: EpochHook | None = None,
) -> FinetuneResult:
    """Fine-tune ``backbone`` plus a new last layer on ``ds.samples[train_idx]`` (never sees the test split).

    ``on_epoch_end(epoch, row)`` is called after each epoch's checkpoint is written. The global random
    generators are seeded by ``cfg.output.seed`` meanwhile and left as they were, as is PyTorch's thread count.
    """
    with _seeded_global_rngs(cfg.output.seed):
        return _finetune(cfg, ds, train_idx, backbone, Path(run_dir), on_epoch_end)


def _finetune(
    cfg: Config,
    ds: Dataset,
    train_idx: np.ndarray,
    backbone: Backbone,
    run_dir: Path,
    on_epoch_end: EpochHook | None,
) -> FinetuneResult:
    ft = cfg.finetune
    seed = cfg.output.seed
    device = resolve_device(cfg.features.device)
    workers = cfg.features.workers or cpu_count()
    if device.type == "cpu":
        torch.set_num_threads(workers)  # PyTorch's own default ignores a container's CPU quota
    labels_all = ds.labels
    n_classes = len(ds.classes)
    rels = [ds.samples[i].rel for i in train_idx]
    identity = _identity(cfg, backbone, rels)
    ckpt_path = run_dir / CKPT_NAME
    ckpt = load_checkpoint(cfg, ds, train_idx, backbone, run_dir)
    if ckpt is not None:
        if ckpt.get("done"):
            log.info(
                "the fine-tuning finished after epoch %d: nothing left to train; its model is evaluated", ckpt["epoch"]
            )
        else:
            log.info("resuming fine-tuning after epoch %d", ckpt["epoch"])
    elif ft.resume:
        log.info("no checkpoint in %s: fine-tuning from the start", run_dir)

    model = _classifier(ft, backbone, n_classes)
    history: list[dict[str, float]] = []
    inf = float("inf")
    best: dict[str, Any] = {"epoch": 0, "val_error": inf, "val_loss": inf, "state": None}  # the weights to keep
    start_epoch, done = 0, False
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        history, best, start_epoch, done = ckpt["history"], ckpt["best"], ckpt["epoch"], ckpt["done"]
        if history:  # the log as the checkpoint has it: a run stopped between the two wrote one of them only
            _write_log(run_dir / LOG_NAME, history)

    skipped: dict[int, str] = dict(ckpt.get("skipped", {})) if ckpt is not None else {}  # undecodable images
    if not done:
        mem = _check_memory(model, cfg, backbone)  # before the images are decoded, the first epoch's slow part
        res, bs = backbone.preprocess.resolution, ft.ft_batch_size
        groups = [s.group for s in ds.samples] if cfg.data.split_mode == "group" else None
        fit_idx, val_idx = split_validation(labels_all, train_idx, ft.val_fraction, seed, groups)

        def decode(idx: np.ndarray, pre: Preprocess) -> ImageCache:
            return build_image_cache(
                [ds.path(ds.samples[i]) for i in idx],
                pre,
                run_dir / "finetune_cache",
                workers,
                cfg.data.max_image_pixels,
                cfg.output.progress,
            )

        cache = decode(train_idx, whole_square(backbone.preprocess))
        skipped = {int(train_idx[r]): why for r, why in cache.errors.items()}
        row_of = {int(s): r for r, s in enumerate(train_idx)}
        fit_idx = np.array([i for i in fit_idx if cache.ok[row_of[int(i)]]], np.int64)
        val_idx = np.array([i for i in val_idx if cache.ok[row_of[int(i)]]], np.int64)
        if len(fit_idx) < 2:
            raise ValueError("fine-tuning needs at least two decodable training images")
        fit_classes = set(labels_all[fit_idx].tolist())
        lost = sorted(set(labels_all[train_idx].tolist()) - fit_classes)  # their images all failed to decode
        if lost and len(fit_classes) < 2:
            unread = [i for i in sorted(skipped) if labels_all[i] in lost]
            eg = f" (e.g. {ds.path(ds.samples[unread[0]])}: {skipped[unread[0]]})" if unread else ""
            raise ValueError(
                f"class {', '.join(repr(ds.classes[c]) for c in lost)}: no training image could be read{eg}; the "
                "training data holds 1 class, and a classifier needs at least two: replace the unreadable images"
            )
        log.info("fine-tuning on %d images, validating on %d (%s)", len(fit_idx), len(val_idx), device)
        if 0 < len(val_idx) < FEW_VALIDATION_IMAGES:
            log.warning(
                "warning: only %d validation images choose the best epoch and stop early (one image is %.0f %% "
                "of them): their choice is noisy; with more images it steadies, and --val-fraction 0 keeps the "
                "last epoch instead",
                len(val_idx),
                100 / len(val_idx),
            )
        if ckpt is None and ft.head_init == "linear_probe":
            _linear_probe_init(cfg, ds, fit_idx, backbone, model.fc)
        fit = CacheLoader(cache, np.array([row_of[int(i)] for i in fit_idx]), labels_all[fit_idx], device)
        # the validation part is scored as the test split will be: the very centre crops at the test resolution
        # (decoded apart: cropped from the training square they were a pixel off for odd margins)
        val_cache = decode(val_idx, eval_preprocess(backbone.preprocess, ft.test_scale)) if len(val_idx) else cache
        val = CacheLoader(val_cache, np.arange(len(val_idx)), labels_all[val_idx], device)
        try:
            _train(
                cfg,
                model,
                backbone,
                fit,
                val,
                device,
                ckpt,
                history,
                best,
                start_epoch,
                {**identity, "skipped": skipped},  # a finished run resumed reports them too
                ckpt_path,
                on_epoch_end,
            )
        except (MemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            available = f", {_gb(mem.available)} was available" if mem.available is not None else ""
            resume = (
                f"; {ckpt_path} holds the last finished epoch: with the same settings --resume continues from it"
                if ckpt_path.is_file()
                else ""
            )
            raise FinetuneMemoryError(
                f"out of memory while fine-tuning (a step of {bs} images at {res} px needs about "
                f"{_gb(mem.need(bs))}{available}): {mem.advice(bs)}, or close other programs{resume}"
            ) from e
        del cache, val_cache, fit, val
    with contextlib.suppress(OSError):  # also the cache of a run stopped after its last checkpoint, resumed
        for f in (run_dir / "finetune_cache").iterdir():
            f.unlink()
        (run_dir / "finetune_cache").rmdir()

    model.load_state_dict(best["state"])
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    state = model.backbone.state_dict()
    tuned_net = model.backbone
    tuned = dataclasses.replace(
        backbone,
        loader=lambda: tuned_net,
        weights_id=f"finetuned:{_state_digest(state)}",
        preprocess=eval_preprocess(backbone.preprocess, ft.test_scale),
    )
    head = LinearHead(
        model.fc.weight.detach().numpy().astype(np.float64),
        model.fc.bias.detach().numpy().astype(np.float64),
        l2_normalize=False,
    )
    figures = {}
    if history:
        best_epoch, trained = int(best["epoch"]), int(history[-1]["epoch"])
        figures["Fine-tuning curves"] = _plot(run_dir / "finetune_curves.png", history, best_epoch)
        if np.isfinite(best["val_error"]):
            log.info("fine-tuning: best epoch %d of %d (validation error %.3f)", best_epoch, trained, best["val_error"])
        else:
            log.info("fine-tuning: no validation score, the last finite epoch (%d of %d) is kept", best_epoch, trained)
    threads = workers if device.type == "cpu" else None
    return FinetuneResult(tuned, head, history, figures, int(best["epoch"]), skipped, threads)


def _stages(net: nn.Module) -> list[str] | None:
    """The stages of a torchvision network, by module name: ``layer1``.. (resnet), ``stage2``.. (shufflenet),
    else the children of the first of :data:`STAGE_CONTAINERS` it has; None if it has none of them."""
    numbered = [name for name, _ in net.named_children() if re.fullmatch(r"(layer|stage)\d+", name)]
    if len(numbered) > 1:
        return numbered
    for path in STAGE_CONTAINERS:
        try:
            container = net.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(container, (nn.Sequential, nn.ModuleList)):
            stages = [f"{path}.{name}" for name, m in container.named_children() if any(True for _ in m.parameters())]
            if len(stages) > 1:
                return stages
    return None


def layer_groups(net: nn.Module) -> list[list[str]]:
    """Parameter names by layer group, input side first: timm's stages (``group_matcher``), or those of
    :func:`_stages`, with the parameters before the first stage (the stem) a group of their own and any
    after a stage (norms, pre-logits layers) in its group. A network with neither warns and uses its
    top-level children."""
    if hasattr(net, "group_matcher"):
        from timm.models import group_parameters

        return [list(names) for names in group_parameters(net, net.group_matcher(coarse=True)).values()]
    stages = _stages(net)
    if stages is None:
        log.warning(
            "warning: no stages known for %s: its top-level modules are taken as the layer groups of --train-groups",
            type(net).__name__,
        )
        stages = [name for name, _ in net.named_children()]
    groups: list[list[str]] = [[] for _ in range(len(stages) + 1)]  # [0]: the stem
    k = 0
    for name, _ in net.named_parameters():
        k = next((i + 1 for i, stage in enumerate(stages) if name.startswith(f"{stage}.")), k)
        groups[k].append(name)
    return [g for g in groups if g]


def _freeze_lower_groups(net: nn.Module, keep: int) -> None:
    """Freeze every layer group but the last ``keep``; autograd then skips the frozen part's backward."""
    groups = layer_groups(net)
    frozen = {n for g in groups[: max(0, len(groups) - keep)] for n in g}
    for name, p in net.named_parameters():
        p.requires_grad_(name not in frozen)
    log.info("fine-tuning the last %d of %d layer groups of the backbone", min(keep, len(groups)), len(groups))


def _linear_probe_init(cfg: Config, ds: Dataset, fit_idx: np.ndarray, backbone: Backbone, fc: nn.Linear) -> None:
    """Start the new layer as a logistic regression on the frozen (cached) features of the fitting images.

    Fine-tuning then starts from a good classifier instead of a random one, so the first full-network
    steps refine the backbone rather than undo it ("linear probe, then fine-tune").
    """
    from sklearn.linear_model import LogisticRegression

    from imgclf.features import FeatureExtractor

    res = FeatureExtractor.from_config(cfg, backbone).extract(
        [ds.path(ds.samples[i]) for i in fit_idx], desc="linear probe features"
    )
    x, y = res.features[res.ok], ds.labels[fit_idx][res.ok]
    lr = LogisticRegression(C=cfg.finetune.probe_c, max_iter=2000).fit(x, y)
    w, b = np.zeros((fc.out_features, x.shape[1])), np.zeros(fc.out_features)
    if len(lr.classes_) == 2:  # one logit for classes_[1]: split it symmetrically over the two rows
        w[lr.classes_], b[lr.classes_] = np.vstack([-lr.coef_, lr.coef_]) / 2, np.array([-1, 1]) * lr.intercept_ / 2
    else:
        w[lr.classes_], b[lr.classes_] = lr.coef_, lr.intercept_
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(w))
        fc.bias.copy_(torch.from_numpy(b))
    log.info("new last layer initialised by a linear probe (training accuracy %.3f)", lr.score(x, y))


def within_noise(error: float, min_error: float, n: int, tolerance: float) -> bool:
    """Whether a validation error on ``n`` images is within ``tolerance`` binomial standard errors of the
    lowest one seen: differences smaller than that are noise (one image of 75 is 1.3 points).

    The standard error counts as at least one image: near zero errors the binomial one is below it (0 at
    0 of 18, 0.054 at 1 of 18, against 0.056 for one image), and one image is never evidence.
    """
    se = math.sqrt(min_error * (1.0 - min_error) / n)
    return error <= min_error + tolerance * max(se, 1.0 / n) + 1e-12


def chance_error(labels: np.ndarray, balanced: bool = False) -> float:
    """Validation error of always answering the commonest class; ``balanced``: class-averaged, 1 - 1/classes."""
    counts = np.bincount(labels)
    return float(1 - (1 / np.count_nonzero(counts) if balanced else counts.max() / counts.sum()))


def choose_epoch(
    scores: Sequence[tuple[float, float]], n: int, tolerance: float, chance: float, n_classes: int
) -> int | None:
    """Which epoch to keep, by position in ``scores`` (validation error and loss on ``n`` images per epoch,
    in order): the latest whose error is :func:`within_noise` of the best one's, the best being the lowest
    error (then loss) with a finite loss; None if no loss is finite.

    Noise never covers a diverged epoch: one whose error, above the best one's, is no better than ``chance``
    (:func:`chance_error`; on 2-3 images the one-image allowance reaches it), or whose loss is far above the
    best one's: more than twice it and more than a quarter of ln ``n_classes`` (the loss of a uniform guess)
    above it, as small losses double without meaning much. An added epoch is thus either chosen or leaves the
    choice as it was.
    """
    finite = [i for i, (_, loss) in enumerate(scores) if math.isfinite(loss)]
    if not finite:
        return None
    ref = min(finite, key=lambda i: scores[i])
    best_error, best_loss = scores[ref]
    far = max(2 * best_loss, best_loss + math.log(n_classes) / 4)
    near = [
        i
        for i in finite
        if (scores[i][0] == best_error or scores[i][0] < chance)  # a validation part of one class: chance 0
        and scores[i][1] <= far
        and within_noise(scores[i][0], best_error, n, tolerance)
    ]
    return max([ref, *near])


def check_input_size(backbone: Backbone, test_scale: float) -> None:
    """ValueError where the network takes one input size only (a vision transformer's patch grid: timm's,
    torchvision's) and the run would train or test at another: said before training, not after it (a ViT
    fine-tuned at 224 px failed at its first test image, 256 px with the default --test-scale)."""
    fixed = None
    for m in backbone.model.modules():
        if getattr(m, "strict_img_size", False) and getattr(m, "img_size", None):  # timm's patch embedding
            fixed = int(m.img_size[0])
        elif type(m).__name__ == "VisionTransformer" and isinstance(getattr(m, "image_size", None), int):
            fixed = m.image_size  # torchvision's
    train, test = backbone.preprocess.resolution, eval_preprocess(backbone.preprocess, test_scale).resolution
    if fixed is not None and (train, test) != (fixed, fixed):
        raise ValueError(
            f"{backbone.name} takes {fixed} px inputs only: give --resolution {fixed} and --test-scale 1 (now "
            f"{train} px in training, {test} px at test time)"
        )


def eval_preprocess(train: Preprocess, scale: float) -> Preprocess:
    """Eval-time geometry of a network fine-tuned at ``train.resolution``: the side times ``scale``, rounded to 8
    (``scale`` 1: the training side as it is).

    Random-resized crops show objects larger than a centre crop of the same side does, so the trained network
    sees them at their training size when tested a little above it ("FixRes", Touvron et al., 2019).
    """
    if scale == 1:
        return train
    return dataclasses.replace(train, resolution=max(8, round(train.resolution * scale / 8) * 8))


def _evaluate(
    model: Classifier,
    loader: CacheLoader,
    norm: Normalizer,
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    balanced: bool = False,
) -> tuple[float, float]:
    """(mean cross-entropy, error rate) on the validation part, eval-time view; ``balanced``: the error
    averaged over classes, each class counting the same."""
    model.eval()
    loss_sum, truth, guess = 0.0, [], []
    with torch.no_grad():
        for x, y in _prefetch(loader.in_order(batch_size), loader):
            with autocast():
                logits = model(norm.center(x)).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            truth.append(y.cpu().numpy())
            guess.append(logits.argmax(1).cpu().numpy())
    if not truth:
        return float("nan"), float("nan")
    y_true = np.concatenate(truth)
    return loss_sum / len(y_true), error_rate(y_true, np.concatenate(guess), balanced)


def error_rate(y_true: np.ndarray, y_pred: np.ndarray, balanced: bool = False) -> float:
    """Share of wrong predictions; ``balanced``: the mean of each true class's share."""
    wrong = y_pred != y_true
    if not balanced:
        return float(wrong.mean())
    return float(np.mean([wrong[y_true == c].mean() for c in np.unique(y_true)]))


def _train(
    cfg: Config,
    model: Classifier,
    backbone: Backbone,
    fit: CacheLoader,
    val: CacheLoader,
    device: torch.device,
    ckpt: dict[str, Any] | None,
    history: list[dict[str, float]],
    best: dict[str, Any],
    start_epoch: int,
    identity: dict[str, Any],
    ckpt_path: Path,
    on_epoch_end: EpochHook | None,
) -> None:
    """The epoch loop: writes the checkpoint (with ``best``), then the log, after every epoch."""
    ft = cfg.finetune
    model.to(device, memory_format=torch.channels_last)
    opt = build_optimizer(model, ft)
    bs = ft.ft_batch_size
    steps = max(1, len(fit.epoch_batches(bs, torch.Generator().manual_seed(0), ft.balance_classes)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(ft, steps))
    gen = torch.Generator().manual_seed(cfg.output.seed)
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        _set_rng_state(gen, ckpt["rng"])
    backbone_fwd: Callable[[torch.Tensor], torch.Tensor] = model.backbone
    if ft.compile:
        backbone_fwd = torch.compile(model.backbone)  # type: ignore[assignment]
    aug = Augment(ft.aug_crop, ft.aug_flip, ft.aug_color, ft.aug_rotate)
    train_res = backbone.preprocess.resolution
    norm = Normalizer(train_res, backbone.mean, backbone.std, device)
    val_norm = Normalizer(
        eval_preprocess(backbone.preprocess, ft.test_scale).resolution, backbone.mean, backbone.std, device
    )
    use_bf16 = resolve_precision(cfg.features.precision, "torch", device.type) == "bf16"
    log.info("training precision: %s", "bf16 autocast" if use_bf16 else "fp32")

    def autocast() -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    criterion = nn.CrossEntropyLoss(label_smoothing=ft.label_smoothing)
    ema = None
    if ft.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ft.ema_decay), use_buffers=True)
        if ckpt is not None:
            ema.load_state_dict(ckpt["ema"])
    kept: nn.Module = ema.module if ema is not None else model  # the weights validated and kept
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not ft.freeze_backbone and ft.head_warmup_epochs >= ft.epochs:
        log.warning(
            "warning: --head-warmup-epochs %d covers all %d epochs: only the new last layer trains, the backbone "
            "never does; give more --epochs (or fewer warm-up epochs) to fine-tune it, or --freeze-backbone",
            ft.head_warmup_epochs,
            ft.epochs,
        )
    if void := settings_without_effect(ft):
        log.warning("warning: settings with no effect in this run: %s", "; ".join(void))
    validated = len(val.rows) > 0
    chance = chance_error(val.labels, ft.balance_classes) if validated else math.nan
    if start_epoch == 0:  # epoch 0, the starting weights: kept unless a fine-tuned epoch does better
        if ft.head_init == "linear_probe" and validated:  # the linear probe: fine-tuning has to beat it
            val_loss, val_error = _evaluate(kept, val, val_norm, 2 * bs, autocast, ft.balance_classes)
            history.append(
                {**dict.fromkeys(LOG_FIELDS, math.nan), "epoch": 0, "val_loss": val_loss, "val_error": val_error}
            )
            best.update(val_error=val_error, val_loss=val_loss)
            log.info("epoch 0 (linear probe): val loss %.3f error %.3f", val_loss, val_error)
        best.update(epoch=0, state=_copy_state(kept))
    for epoch in range(start_epoch + 1, ft.epochs + 1):
        head_only = ft.freeze_backbone or epoch <= ft.head_warmup_epochs
        model.train()
        if head_only:
            model.backbone.eval()  # frozen: keep the pretrained batch-norm statistics
        else:  # keep the pretrained statistics (the affine weights still train), always in frozen groups
            for m in model.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
                    ft.freeze_bn or not any(p.requires_grad for p in m.parameters())
                ):
                    m.eval()
        t0, seen, step, lr_sum = time.perf_counter(), 0, 0, 0.0
        # summed on the device: reading a value back each step would stall a GPU until it drains
        loss_sum = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
        wrong = torch.zeros((), dtype=torch.int64, device=device)
        batches = fit.epoch_batches(bs, gen, ft.balance_classes)
        shown = t0  # when the progress bar last read the sums back: at most twice a second
        bar = tqdm(
            _prefetch(batches, fit),
            total=len(batches),
            desc=f"epoch {epoch}/{ft.epochs}",
            unit="batch",
            disable=not cfg.output.progress,
            leave=False,
        )
        for step, (x, y) in enumerate(bar, 1):
            xb = norm.random(x, aug, gen, train_res)
            with autocast():
                if head_only:
                    with torch.no_grad():
                        feats = backbone_fwd(xb)
                    logits = model.fc(model.dropout(feats.float()))
                else:
                    logits = model.fc(model.dropout(backbone_fwd(xb)))
                loss = criterion(logits.float(), y)
            # logged without label smoothing, like the validation loss
            plain = F.cross_entropy(logits.detach().float(), y) if ft.label_smoothing else loss.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if ft.clip_grad:
                nn.utils.clip_grad_norm_(trainable, ft.clip_grad)
            opt.step()
            lr_sum += opt.param_groups[0]["lr"]  # the rate this step used (the head's)
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            seen += len(y)
            loss_sum += plain.to(loss_sum.dtype) * len(y)
            wrong += (logits.detach().argmax(1) != y).sum()
            now = time.perf_counter()
            if cfg.output.progress and (now - shown >= 0.5 or step == len(batches)):
                shown = now
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", img_s=f"{seen / (now - t0):.1f}")
        train_loss, train_error = float(loss_sum) / max(1, seen), int(wrong) / max(1, seen)  # waits for the device
        train_s = time.perf_counter() - t0
        val_loss, val_error = _evaluate(kept, val, val_norm, 2 * bs, autocast, ft.balance_classes)
        row = {
            "epoch": epoch,
            "lr": lr_sum / max(1, step),  # the head's mean rate over the epoch
            "train_loss": train_loss,
            "train_error": train_error,
            "val_loss": val_loss,
            "val_error": val_error,
            "img_per_s": seen / train_s,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        val_text = f"val loss {val_loss:.3f} error {val_error:.3f}" if len(val.rows) else "no validation part"
        left = (ft.epochs - epoch) * row["seconds"]  # at this epoch's pace; early stopping may end sooner
        log.info(
            "epoch %d/%d: train loss %.3f error %.3f | %s | %.1f img/s%s",
            epoch,
            ft.epochs,
            row["train_loss"],
            row["train_error"],
            val_text,
            row["img_per_s"],
            f" | about {_duration(left)} to go" if left else "",
        )
        model_state = _copy_state(model)
        diverged = not (math.isfinite(train_loss) and all(v.isfinite().all() for v in model_state.values()))
        if diverged:  # from here on the weights are garbage: the best finite epoch stays kept
            log.warning(
                "warning: fine-tuning diverged in epoch %d (training loss %s): stopped; epoch %d is kept; lower --lr "
                "(now %g)",
                epoch,
                f"{train_loss:.3g}" if math.isfinite(train_loss) else train_loss,
                best["epoch"],
                ft.lr,
            )
        elif validated:
            scores = [(h["val_error"], h["val_loss"]) for h in history]
            k = choose_epoch(scores, len(val.rows), ft.val_tolerance, chance, model.fc.out_features)
            if k is not None and history[k]["epoch"] == epoch:  # else the kept epoch stays (see choose_epoch)
                best.update(epoch=epoch, val_error=val_error, val_loss=val_loss)
        else:  # no validation part: the last epoch
            best.update(epoch=epoch)
        if best["epoch"] == epoch:
            best["state"] = model_state if kept is model else _copy_state(kept)
        no_gain = epoch - best["epoch"] if validated else 0
        stop = diverged or (ft.early_stopping > 0 and no_gain >= ft.early_stopping)
        done = stop or epoch == ft.epochs
        _save_ckpt(  # before the log: a run stopped between the two has no log row its checkpoint lacks
            ckpt_path,
            {
                **identity,
                "epoch": epoch,
                "done": done,
                "model": model_state,
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "best": best,
                "history": history,
                "rng": _rng_state(gen),
            },
        )
        _write_log(ckpt_path.parent / LOG_NAME, history)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if stop:
            if not diverged:
                log.info(
                    "early stopping: no validation gain for %d epoch%s",
                    ft.early_stopping,
                    "" if ft.early_stopping == 1 else "s",
                )
            break
