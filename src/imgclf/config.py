"""One typed configuration: every parameter, its default and a one-line description.

The configuration is grouped in sections (``data``, ``backbone``, ``features``, ``classifier``, ``finetune``,
``serve``, ``datatools``, ``tracking``, ``output``). A TOML or YAML file uses the same sections; on the command
line every field is a flag of the same name (``--train-fraction 0.8``, ``--train_fraction 0.8``), field names
being unique across sections. The resolved configuration is saved with every run (``config.json``).
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
import re
import tomllib
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

log = logging.getLogger("imgclf")


MAX_SEED = 2**32 - 1  # numpy's largest seed
MAX_HASH_SIZE = 64  # a dhash of 4096 bits; hash_size 100000 ran out of memory
# A model input's side: at test_scale 2, 8192 x 8192 = 67 Mpx, below the 179 Mpx Pillow refuses to make (which
# stopped --resolution 20000 at the first image, its run folder marked unfinished); the tutorial's largest is 896.
MAX_RESOLUTION = 4096


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # --lr inf, nan

    @field_validator("*", mode="before")
    @classmethod
    def _no_empty_path_nor_bool_number(cls, value: Any, info: Any) -> Any:
        """An empty path (an unset shell variable, ``--out "$OUT"``) would mean the working folder: refused, as
        is one that is not UTF-8 (:func:`utf8_problem`). So is true/false for a number (a file's ``lr = true``
        was read as 1.0)."""
        annotation = cls.model_fields[info.field_name].annotation
        kinds = (annotation, *typing.get_args(annotation))
        if value == "" and Path in kinds:
            raise ValueError("an empty path (an unset variable?): give a file or folder name")
        if isinstance(value, str | Path) and Path in kinds and (problem := utf8_problem(value)):
            raise ValueError(problem)
        values = value if isinstance(value, list | tuple) else [value]
        bools = any(type(v).__name__ in ("bool", "bool_") for v in values)  # numpy's too
        if bool not in kinds and {int, float} & set(kinds) and bools:
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value

    @field_validator("*")
    @classmethod
    def _expand_home(cls, value: Any) -> Any:
        """``~`` in a path is the home folder, in a configuration file too (the shell expands only flags)."""
        return value.expanduser() if isinstance(value, Path) else value


def utf8_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be a setting: a name holding bytes that are not UTF-8 (which Python reads as
    ``\\udcff``; config.json, metrics.json and the hash cache hold paths as UTF-8 text, and writing them
    failed, after the run folder was marked); None where it can be."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(text).decode("utf-8", "backslashreplace")
        return f"{shown} is not valid UTF-8 text, which imgclf records paths in: rename it"
    return None


class DataConfig(_Section):
    """Where the images are and how they are split."""

    data_root: Path | None = Field(
        None, description="Folder with one sub-folder per class (or train/ and val/ or test/)."
    )
    split_mode: Literal["auto", "random", "predefined", "list", "group"] = Field(
        "auto",
        description="auto: list given --test-list, else predefined if train/ + val/|test/ exist, else random; "
        "group: class sub-folders stay whole.",
    )
    train_fraction: float = Field(0.75, gt=0.0, lt=1.0, description="Share of each class put in the training split.")
    split_seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the random split (same split on every machine).")
    test_list: Path | None = Field(
        None, description="Text file of image paths (relative to data_root) that form the test split."
    )
    max_image_pixels: int = Field(
        100_000_000, gt=0, description="Images with more pixels are skipped (decompression-bomb guard)."
    )
    max_file_mb: float = Field(100.0, gt=0, description="Image files larger than this many MB are skipped.")


AUTO_BACKBONE = "auto"
AUTO_CANDIDATES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")  # offline, cheapest first


class BackboneConfig(_Section):
    """The pretrained network that turns an image into features."""

    backbone: str = Field(
        "efficientnet_lite0",
        description="efficientnet_lite0/1/2 (offline), a timm or torchvision:NAME model, or auto (svm: the lite "
        "best in cross-validation).",
    )
    weights: Path | None = Field(None, description="Local state_dict file for the backbone (instead of downloading).")
    resolution: int | None = Field(
        None,
        ge=32,
        le=MAX_RESOLUTION,
        description="Input resolution in pixels (224, 448, 896...); default: the backbone's. Fine-tuning trains at it.",
    )


class FeatureConfig(_Section):
    """How features are computed and cached."""

    runtime: Literal["auto", "openvino", "onnxruntime", "torch"] = Field(
        "auto", description="Inference engine for features: auto = openvino on a CPU where installed, else torch."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Compute precision: auto = bf16 on GPUs with native bf16 (and in the server with OpenVINO on "
        "AMX CPUs), else fp32.",
    )
    device: str = Field("auto", description="torch device: auto (cuda if present, else cpu), cpu, cuda, cuda:1...")

    @field_validator("device")
    @classmethod
    def _device_spelling(cls, device: str) -> str:
        """A device imgclf runs on, spelt as torch spells it (``gpu`` was refused only once a train had marked
        its run folder; whether this machine has it is train's check, before that)."""
        if not re.fullmatch(r"auto|(cpu|mps|cuda)(:\d+)?", device):
            raise ValueError("expected auto, cpu, cuda, cuda:N (N: the GPU's number) or mps")
        return device

    batch_size: int = Field(32, ge=1, description="Images per forward pass.")
    workers: int = Field(
        0,
        ge=0,
        description="Decoding, inference and fine-tuning threads (the count changes fine-tuned weights slightly); "
        "0 = the usable CPU cores.",
    )
    cache_dir: Path | None = Field(None, description="Feature cache folder; default $IMGCLF_CACHE or ~/.cache/imgclf.")
    use_cache: bool = Field(
        True,
        description="Reuse cached features of unchanged images, and head fits, metrics and figures of identical ones.",
    )
    flip_tta: bool = Field(False, description="Average the features of each image and its mirror image (2x slower).")


class ClassifierConfig(_Section):
    """The classifier on top of the backbone."""

    classifier: Literal["svm", "dnn", "svm_on_refined"] = Field(
        "svm",
        description="svm: linear SVM on frozen features; dnn: fine-tune; svm_on_refined: SVM on fine-tuned features.",
    )
    l2_normalize: bool = Field(True, description="L2-normalise feature vectors before the SVM.")
    svm_c_grid: list[float] = Field(
        [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
        min_length=1,
        description="SVM C values tried; the best is chosen by cross-validation on the training split.",
    )
    cv_folds: int = Field(5, ge=2, description="Stratified cross-validation folds used to choose C and calibrate.")

    @field_validator("svm_c_grid")
    @classmethod
    def _c_positive(cls, grid: list[float]) -> list[float]:
        if any(c <= 0 for c in grid):
            raise ValueError("every C must be a number greater than 0")
        return grid

    class_weight: Literal["none", "balanced"] = Field(
        "none", description="balanced: weight classes inversely to their size; C chosen by class-averaged accuracy."
    )


class FinetuneConfig(_Section):
    """Fine-tuning the whole network (classifier dnn / svm_on_refined)."""

    epochs: int = Field(8, ge=1, description="Training epochs (passes over the training part).")
    ft_batch_size: int = Field(32, ge=2, description="Images per training step (2 or more, for batch norm).")
    test_scale: float = Field(
        1.15,
        ge=0.5,
        le=2.0,
        description="A fine-tuned network is evaluated and deployed at resolution x this (1 = the training side).",
    )
    optimizer: Literal["sgd", "adamw"] = Field(
        "adamw", description="adamw (stable on small data sets), or sgd: momentum SGD (the tutorial's)."
    )
    lr: float = Field(0.001, gt=0, description="Peak learning rate of the new last layer.")
    backbone_lr_mult: float = Field(
        0.05, ge=0, description="Backbone learning rate = lr x this (0 with freeze_backbone)."
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay (L2 with sgd, decoupled with adamw).")
    schedule: Literal["cosine", "step"] = Field(
        "cosine", description="cosine with warm-up, or the tutorial's step decay."
    )
    warmup_epochs: float = Field(1.0, ge=0, description="Linear learning-rate warm-up (cosine schedule).")
    step_epochs: int = Field(
        5, ge=1, description="Step schedule: multiply the rate by step_gamma every this many epochs."
    )
    step_gamma: float = Field(0.1, gt=0, le=1, description="Step schedule: factor applied every step_epochs.")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout before the new last layer.")
    drop_path: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Stochastic depth in training: residual blocks skipped at random, at rates rising with depth "
        "towards this one.",
    )
    clip_grad: float = Field(0.0, ge=0, description="Clip the gradient norm to this value before each step (0 = off).")
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Validate and keep an exponential moving average of the weights, this decay per step (0 = off).",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy loss.")
    freeze_backbone: bool = Field(False, description="Train the new last layer only.")
    train_groups: int = Field(
        0, ge=0, description="Fine-tune only the last N layer groups (stages) of the backbone; 0 = all of it."
    )
    freeze_bn: bool = Field(True, description="Keep the backbone's batch-norm statistics fixed (best on small data).")
    head_init: Literal["linear_probe", "random"] = Field(
        "linear_probe",
        description="New last layer starts as a logistic regression on frozen features (linear_probe) or random.",
    )
    probe_c: float = Field(0.5, gt=0, description="Inverse L2 strength of the linear-probe logistic regression.")
    head_warmup_epochs: int = Field(
        0,
        ge=0,
        description="Epochs training the head only before unfreezing the backbone (the learning-rate schedule, "
        "warm-up included, runs over them too).",
    )
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of the training split held out for early stopping.")
    early_stopping: int = Field(3, ge=0, description="Stop after this many epochs past the best epoch (0 = off).")
    val_tolerance: float = Field(
        1.0,
        ge=0,
        description="Best epoch: the latest whose validation error is within this many standard errors (each at "
        "least one image) of the lowest.",
    )
    aug_crop: bool = Field(True, description="Augment: random resized crop.")
    aug_flip: bool = Field(True, description="Augment: horizontal flip.")
    aug_color: bool = Field(True, description="Augment: colour jitter.")
    aug_rotate: float = Field(
        10.0, ge=0, le=180, description="Augment: random rotation up to this many degrees (0 = off)."
    )
    balance_classes: bool = Field(
        False, description="Draw training images with class-balancing weights; validate by class-averaged error."
    )
    compile: bool = Field(False, description="torch.compile the model (GPU; slower start, faster epochs).")
    resume: bool = Field(False, description="Resume an interrupted fine-tuning run from its last checkpoint.")


class ServeConfig(_Section):
    """The REST service."""

    host: str = Field("127.0.0.1", min_length=1, description="Address the server listens on (0.0.0.0 for all).")
    port: int = Field(8000, ge=0, le=65535, description="Port the server listens on.")
    api_key: str | None = Field(
        None,
        description="If set (or $IMGCLF_API_KEY), requests need header X-API-Key with this value (never written to a "
        "file).",
    )
    serve_runtime: Literal["auto", "openvino", "onnxruntime", "torch"] = Field(
        "auto", description="Inference engine of the server (auto: openvino on CPU, torch on GPU)."
    )
    max_upload_mb: float = Field(20.0, gt=0, description="Largest request body accepted, in MB.")
    max_images_per_request: int = Field(16, ge=1, description="Most images in one request.")
    max_batch: int = Field(16, ge=1, description="Most images in one micro-batched forward pass.")
    max_wait_ms: float = Field(5.0, ge=0, description="Longest wait for more requests to fill a micro-batch.")
    top_k: int = Field(3, ge=1, description="Labels returned per image, best first.")
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds to answer a request (else 503, busy) and for its body to arrive (else 408) or its "
        "headers (else closed).",
    )

    @field_validator("api_key")
    @classmethod
    def _key_one_can_send(cls, key: str | None) -> str | None:
        """Refuse a key that would leave the service open or let nobody in: empty (an unset variable would turn
        authentication off), or not printable ASCII without spaces at either end (what an HTTP header carries)."""
        if key is None:
            return key
        if not key.strip():
            raise ValueError(
                "an empty API key (an unset variable?): give one, e.g. IMGCLF_API_KEY=$(openssl rand -hex 16) or "
                '--api-key "$(openssl rand -hex 16)"'
            )
        if not (key.isascii() and key.isprintable()) or key != key.strip():
            raise ValueError(
                "the API key must be printable ASCII (letters, digits, punctuation) with no space at either end: "
                "clients send it in an HTTP header, which carries nothing else"
            )
        return key

    @field_serializer("api_key", when_used="json")
    def _never_written(self, key: str | None) -> None:
        """JSON (config.json, the bundle, reports, MLflow) never holds the key; the value in memory does."""
        return None


class DataToolsConfig(_Section):
    """Downloading, image search and near-duplicate detection."""

    download_workers: int = Field(8, ge=1, description="Concurrent downloads.")
    timeout_s: float = Field(
        20.0, gt=0, description="Per-request timeout in seconds (connecting, each read, and one image's whole body)."
    )
    retries: int = Field(3, ge=0, description="Retries per URL, with exponential back-off.")
    backoff_s: float = Field(1.0, ge=0, description="Seconds before the first retry; doubled for each next one.")
    max_backoff_s: float = Field(30.0, ge=0, description="Longest wait between retries (caps Retry-After too).")
    max_download_mb: float = Field(20.0, gt=0, description="Downloads larger than this are refused.")
    max_side: int = Field(1000, ge=0, description="Downloaded images are resized to this longest side (0 = keep).")
    keep_originals: bool = Field(False, description="Also keep the original downloaded file.")
    refetch_removed: bool = Field(
        False, description="Download again the images sources.tsv lists that you removed from the folder since."
    )
    provider: Literal["openverse", "bing"] = Field("openverse", description="Image search provider for scrape.")
    provider_url: str | None = Field(None, description="Base URL of the search provider (default: the provider's own).")
    per_query: int = Field(50, ge=1, description="Results per search query.")
    hash_size: int = Field(16, ge=2, le=MAX_HASH_SIZE, description="dhash size for near-duplicate detection.")
    max_distance: int = Field(
        0, ge=0, description="Images whose dhashes differ in at most this many bits are duplicates."
    )
    fail_on_leak: bool = Field(False, description="train refuses to run when near-duplicates straddle train and test.")

    @field_validator("provider_url")
    @classmethod
    def _password_that_parses(cls, url: str | None) -> str | None:
        """Refuse a ``user:password@`` part holding ``#``, ``?`` or ``/``: they end a URL's host part, so the
        request fails and its messages would show the password (a proper one is sent, and never shown)."""
        if url is not None and broken_password(url):
            raise ValueError(
                "its user:password part holds '#', '?' or '/', which end the host part of a URL: write them as "
                "%23, %3F and %2F"
            )
        return url

    @model_validator(mode="after")
    def _distance_below_unrelated(self) -> DataToolsConfig:
        bits = self.hash_size**2
        if self.max_distance >= bits // 4:
            raise ValueError(
                f"max_distance {self.max_distance} (--max-distance) would make unrelated images duplicates: a "
                f"dhash of hash_size {self.hash_size} (--hash-size) has {bits} bits, and unrelated images differ "
                f"in about half of them; use less than {bits // 4}"
            )
        return self


def broken_password(url: str) -> bool:
    """Whether ``url`` holds ``user:password@`` with ``#``, ``?`` or ``/`` in the password, unencoded (a URL
    parser ends the host part there: ``host:8080/a@b``, a port and a path, is not one)."""
    userinfo = url.partition("://")[2].rpartition("@")[0]
    user, colon, password = userinfo.partition(":")
    cut = min((i for i in map(password.find, "/?#") if i >= 0), default=-1)
    ipv6 = userinfo.startswith("[")  # http://[::1]:8080/@x: an address, a port and a path
    return bool(colon) and not ipv6 and "/" not in user and cut >= 0 and not password[:cut].isdigit()


class TrackingConfig(_Section):
    """Run history in MLflow."""

    tracking: bool = Field(True, description="Record every train and evaluate run with MLflow.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow store; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db and mlruns/ in the working folder.",
    )
    experiment: str = Field(
        "imgclf", min_length=1, max_length=500, description="MLflow experiment the runs are recorded in."
    )  # 500: MLflow's longest experiment name
    tracking_background: bool = Field(
        True, description="Record runs from a background process, so commands return without waiting for MLflow."
    )

    @field_validator("tracking_uri")
    @classmethod
    def _no_password(cls, uri: str | None) -> str | None:
        if uri is not None and (problem := cls.password_problem(uri)):
            raise ValueError(problem)
        return uri

    @staticmethod
    def password_problem(uri: str) -> str | None:
        """Why ``uri`` is refused: a password in it would be printed, logged and saved with every run."""
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(uri)
        except ValueError:  # not a URL ("[" in a path): no password in it
            return None
        if parts.password is None:
            return None
        where = (
            "put the user name and password in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (MLflow's "
            "own environment variables)"
            if parts.scheme in ("http", "https")
            else "let the database client find the password (PostgreSQL: PGPASSWORD or ~/.pgpass)"
        )
        shown = f"{parts.scheme}://{parts.username}:***@{parts.netloc.rpartition('@')[2]}{parts.path}"
        return f"{shown} holds a password, which would be printed and saved with every run: leave it out and {where}"


class OutputConfig(_Section):
    """Where results go."""

    out: Path = Field(Path("runs/latest"), description="Run folder: split, metrics, report, predictions, model bundle.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed for everything random besides the split.")
    progress: bool = Field(True, description="Show progress bars (on the command line: only on a terminal).")


def _nest(raw: Any, source: str) -> Any:
    """A file's top level with flat parameter names (``epochs: 5``) moved into their sections; ValueError for a
    name given both ways with two values (which one won depended on their order in the file)."""
    if not isinstance(raw, dict):
        return raw
    index, out, flat = field_index(), {}, set()
    for key, value in raw.items():
        if key in index and not (key in Config.model_fields and isinstance(value, dict)):
            flat.add(key)
            out.setdefault(index[key], {})[key] = value
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            # sections (a copy: raw is compared below), and unknown names left for the validation message
            out[key] = dict(value) if isinstance(value, dict) else value
    for name in sorted(flat):
        section = raw.get(index[name])
        if isinstance(section, dict) and name in section and section[name] != raw[name]:
            raise ValueError(
                f"{source}: {name} given twice, {raw[name]!r} at the top and {section[name]!r} in [{index[name]}]: "
                "keep one"
            )
    return out


# Settings of earlier versions, by section.name, with what to do instead. A config.json of an old run holds
# them: left out where null (their default then), named where set.
RETIRED = {
    "finetune.ft_resolution": (
        "fine-tuning trains at resolution now, which also sets the side of testing and serving (times test_scale): "
        "give resolution if that is meant, or leave it out"
    ),
}
_warned: set[str] = set()  # the warnings of from_saved given in this process: once each


def _retired(raw: Any, source: str, refuse: bool) -> None:
    """Take the retired settings (``RETIRED``) out of ``raw`` (nested, or flat at the top), in place: null ones
    quietly; ValueError for a set one where ``refuse``, else it is left for the caller to drop and name."""
    if not isinstance(raw, dict):
        return
    for key, advice in RETIRED.items():
        section, name = key.split(".")
        for holder in (raw.get(section), raw):
            if isinstance(holder, dict) and name in holder:
                if holder[name] is None:
                    del holder[name]
                elif refuse:
                    raise ValueError(f"{source}: {key} = {holder[name]!r} is a setting of an earlier imgclf: {advice}")


# Settings of the machine a command runs on, and of how it shows its answers, not of the model: evaluate and
# predict take them from where they run (a run trained with --device cuda could not be used on a laptop), not
# from the trained run.
MACHINE_FIELDS = ("features.device", "features.workers", "features.cache_dir", "serve.top_k")


class Config(BaseModel):
    """The whole configuration of a run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: DataConfig = Field(default_factory=DataConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    datatools: DataToolsConfig = Field(default_factory=DataToolsConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _auto_backbone_for_svm(self) -> Config:
        if self.backbone.backbone == AUTO_BACKBONE and (
            self.classifier.classifier != "svm" or self.backbone.weights is not None
        ):
            raise ValueError(
                "backbone auto chooses by the SVM's cross-validation on frozen features: use it with "
                "--classifier svm and without --weights"
            )
        return self

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        base: Config | None = None,
        then: dict[str, Any] | None = None,
        only: Collection[str] | None = None,
    ) -> Config:
        """Load a TOML (.toml), YAML (.yaml/.yml) or JSON file with the same sections, or flat parameter names.

        The fields the file sets replace those of ``base`` (default: the defaults); ``then`` (flat names: the
        flags) replaces the file's, checked together with them (a file's ``max_distance`` may need the flags'
        ``hash_size``). ``only``: the fields a file may change (a command on a trained run takes the rest from the
        run); others it sets are left as ``base`` has them, with a warning naming them.
        """
        path = Path(path).expanduser()  # --config=~/x.toml: no shell expands it
        if path.is_dir():
            raise IsADirectoryError(f"configuration file {path} is a folder: give a .toml, .yaml or .json file")
        if not path.is_file():
            raise FileNotFoundError(f"configuration file not found: {path}")
        if path.suffix.lower() not in (".toml", ".yaml", ".yml", ".json"):
            raise ValueError(f"{path}: configuration files must end in .toml, .yaml, .yml or .json")
        from imgclf.utils import read_utf8

        text = read_utf8(path, "configuration file")
        try:
            if path.suffix.lower() == ".toml":
                raw = tomllib.loads(text)
            elif path.suffix.lower() in (".yaml", ".yml"):
                raw = yaml.safe_load(text) or {}
            else:
                raw = json.loads(text)
        except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
            mark = getattr(e, "problem_mark", None)  # YAML's own message spans several lines
            why = f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}" if mark else str(e)  # type: ignore[attr-defined]
            raise ValueError(f"{path}: not a valid {path.suffix.lstrip('.').upper()} file ({why})") from None
        _retired(raw, str(path), refuse=True)
        nested, index = _nest(raw, str(path)), field_index()
        sections = nested.values() if isinstance(nested, dict) else ()
        flags = set(then or {})
        filed = {name for section in sections if isinstance(section, dict) for name in section} - flags
        for name, value in (then or {}).items():
            if name not in index:
                raise KeyError(f"unknown parameter {name!r}; see `imgclf config --show`")
            if isinstance(nested, dict) and isinstance(nested.setdefault(index[name], {}), dict):
                nested[index[name]][name] = value

        def invalid(e: ValidationError) -> ValueError:
            named: set[str] = set()  # the settings each error is about: a section's check, all given in it
            for err in e.errors():
                names = [part for part in err["loc"] if isinstance(part, str)]
                if len(names) == 1 and names[0] in cls.model_fields:
                    named |= {name for name in filed | flags if index.get(name) == names[0]}
                else:
                    named |= set(names[1:] or names) if names else filed | flags
            if named and named <= flags:  # the flags' values alone: not the file's fault
                return ValueError(describe_errors(e))
            return ValueError(f"{path}{' with the flags given' if named & flags else ''}: {describe_errors(e)}")

        try:
            loaded = cls.model_validate(nested)
        except ValidationError as e:
            raise invalid(e) from None
        base = base or cls()
        given = loaded.given()
        if only is not None:
            now = {name: getattr(getattr(base, index[name]), name) for name in given}
            if unused := sorted(k for k, v in given.items() if k not in only and v != now[k]):
                log.warning(
                    "%s: %s left as the run has them: this command takes from a file only the settings of its "
                    "own flags (see its --help)",
                    path,
                    ", ".join(unused),
                )
            given = {name: value for name, value in given.items() if name in only}
        try:
            return base.updated(**given)
        except ValidationError as e:
            raise invalid(e) from None

    @classmethod
    def of_run(cls, raw: dict[str, Any], source: str, changes: Config | None = None) -> Config:
        """A trained run's configuration (:meth:`from_saved`) for a command on this machine: the settings of
        :data:`MACHINE_FIELDS` are this machine's defaults, not those of the machine it was trained on. The
        settings given in ``changes`` (:meth:`given`) override the run's: a notebook's
        ``Config().updated(batch_size=8)`` changes the batch size, not the data folder or the resolution."""
        here = cls().flat()
        names = [field.split(".")[1] for field in MACHINE_FIELDS]
        given = changes.given() if changes is not None else {}
        return cls.from_saved(raw, source).updated(**{**{name: here[name] for name in names}, **given})

    def given(self) -> dict[str, Any]:
        """The settings given by flat name: set when made, by :meth:`updated` or by assignment, even to their
        default value (a configuration read from a file or a run has all of its fields given)."""
        sections = [getattr(self, name) for name in type(self).model_fields]  # a section assigned into is unset
        return {name: getattr(sec, name) for sec in sections for name in sec.model_fields_set}

    @classmethod
    def from_saved(cls, raw: dict[str, Any], source: str) -> Config:
        """The configuration a run saved (``config.json``, a bundle's), read by this imgclf: settings it no
        longer knows or accepts are left out, their defaults used, with a warning naming them, so that a run
        of an older version still loads."""
        raw, dropped = copy.deepcopy(raw), []
        _retired(raw, source, refuse=False)
        while True:
            try:
                cfg = cls.model_validate(raw)
                break
            except ValidationError as e:
                found = [[p for p in err["loc"] if isinstance(p, str)][:2] for err in e.errors()]
                if not found or any(len(names) < 2 or names[0] not in raw for names in found):
                    raise ValueError(f"{source}: {describe_errors(e)}") from None
                for section, name in found:
                    raw[section].pop(name, None)
                    dropped.append(f"{section}.{name}")
        said = f"{source}: settings this imgclf does not know or accept (the run was made by another version), "
        said += "their defaults used instead: "
        said += ", ".join(dropped)
        if dropped and said not in _warned:  # evaluate and predict read the run's configuration twice
            _warned.add(said)
            log.warning("%s", said)
        return cfg

    def updated(self, **flat: Any) -> Config:
        """A copy with fields replaced by flat name (``train_fraction=0.8``), validated; the settings given
        are this one's and those replaced (:meth:`given`)."""
        raw = {name: getattr(self, name).model_dump(exclude_unset=True) for name in type(self).model_fields}
        index = field_index()
        for name, value in flat.items():
            if name not in index:
                raise KeyError(f"unknown parameter {name!r}; see `imgclf config --show`")
            raw.setdefault(index[name], {})[name] = value
        return Config.model_validate(raw)

    def flat(self) -> dict[str, Any]:
        """Every field by its flat name, JSON-ready."""
        dumped = self.model_dump(mode="json")
        return {name: value for section in dumped.values() for name, value in section.items()}

    def record(self) -> dict[str, Any]:
        """The configuration as a run records it (config.json, the bundle's, MLflow's parameters), JSON-ready:
        without ``resume``, an instruction about a checkpoint rather than a setting of the run (training again
        from a record that said false removed an interrupted fine-tuning's checkpoint, one that said true
        continued it)."""
        recorded = self.model_dump(mode="json")
        del recorded["finetune"]["resume"]
        return recorded

    def save(self, path: str | Path) -> None:
        """Write :meth:`record` as JSON, atomically, into an existing folder (a run folder removed meanwhile is
        not made again)."""
        from imgclf.utils import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.record(), indent=2, ensure_ascii=False), parents=False)


def field_index() -> dict[str, str]:
    """Flat field name -> section name."""
    index: dict[str, str] = {}
    for section_name, section in Config.model_fields.items():
        for name in section.annotation.model_fields:  # type: ignore[union-attr]
            index[name] = section_name
    return index


def parameter_table() -> list[tuple[str, str, str, str, str]]:
    """(section, name, type, default, description) for every parameter."""
    rows = []
    for section_name, section in Config.model_fields.items():
        for name, info in section.annotation.model_fields.items():  # type: ignore[union-attr]
            default = info.get_default(call_default_factory=True)
            rows.append(
                (
                    section_name,
                    name,
                    type_name(info.annotation),
                    json.dumps(default, default=str),
                    info.description or "",
                )
            )
    return rows


def type_name(annotation: Any) -> str:
    """Readable name of a field's type."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(annotation) if a is not type(None)) + " | None"
    if origin is list:
        return f"list[{type_name(typing.get_args(annotation)[0])}]"
    return getattr(annotation, "__name__", str(annotation))


def describe_errors(error: ValidationError) -> str:
    """Pydantic's errors as one line naming each parameter and its flag, with a guess for a misspelt name."""
    index = field_index()
    out = []
    for err in error.errors():
        err["msg"] = err["msg"].removeprefix("Value error, ")  # a check of ours: its text says it all
        names = [part for part in err["loc"] if isinstance(part, str)]
        dotted = ".".join(names)
        if err["type"] == "extra_forbidden" and len(names) > 1 and names[-1] in index:  # in the wrong section
            out.append(f"{dotted}: {names[-1]} belongs in [{index[names[-1]]}], not [{names[0]}]")
        elif err["type"] == "extra_forbidden":
            known = list(index) if len(names) > 1 else [*Config.model_fields, *index]
            close = difflib.get_close_matches(names[-1], known, n=1)
            kind = "parameter" if len(names) > 1 else "section or parameter"
            out.append(f"{dotted}: unknown {kind}" + (f" (did you mean {close[0]}?)" if close else ""))
        elif len(names) > 1:
            secret = (
                names[-1] == "api_key"
                or (names[-1] == "tracking_uri" and TrackingConfig.password_problem(str(err["input"])))
                or (names[-1] == "provider_url" and broken_password(str(err["input"])))
            )
            value = "(not shown)" if secret else repr(err["input"])
            out.append(f"{dotted} = {value} (--{names[-1].replace('_', '-')}): {err['msg']}")
        else:
            out.append(f"{dotted or 'configuration'}: {err['msg']}")
    return "; ".join(out)
