"""Backbone loading (random init, local files, DINO checkpoints, offline errors) and pre-processing."""

from __future__ import annotations

import argparse
import hashlib

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

from funad.pipelines.backbone import (
    BackboneSpec,
    ImageTransform,
    MaskTransform,
    image_transform,
    load_backbone,
    normalize_state_dict,
    resize_for,
)
from funad.pipelines.errors import BackboneError

TINY = "vit_tiny_patch16_224"  # 12 blocks, C=192; at 64 px a 4x4 grid
SIZE = 64


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(BackboneSpec(TINY, image_size=SIZE, pretrained=False), "cpu", precision="fp32")


@pytest.fixture(scope="module")
def reference():
    """The same seeded random model built by timm directly, unpruned."""
    torch.manual_seed(0)
    return timm.create_model(TINY, pretrained=False, img_size=SIZE, num_classes=0).eval()


@pytest.fixture(scope="module")
def tiny_state(reference):
    return {k: v.clone() for k, v in reference.state_dict().items()}


def images(n: int = 3, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- tokens


def test_default_layer_is_last_block_after_final_norm(tiny, reference):
    x = images()
    cls, patches = tiny(x)
    assert tiny.layer == 11 and tiny.grid == (4, 4) and tiny.token_dim == 192
    assert cls.shape == (3, 192) and patches.shape == (3, 16, 192) and patches.dtype == torch.float32
    with torch.no_grad():
        full = reference.forward_features(x)  # (n, 1 + P, C), final norm applied
    torch.testing.assert_close(cls, full[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(patches, full[:, 1:], rtol=1e-4, atol=1e-4)


def test_intermediate_block_matches_timm(reference):
    bb = load_backbone(BackboneSpec(TINY, image_size=SIZE, layer=-5, pretrained=False), "cpu", precision="fp32")
    assert bb.layer == 7 and len(bb.model.blocks) == 8  # later blocks pruned
    x = images()
    cls, patches = bb(x)
    with torch.no_grad():
        (ref_patches, ref_prefix), = reference.forward_intermediates(
            x, indices=[7], norm=True, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True)
    torch.testing.assert_close(patches, ref_patches, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cls, ref_prefix[:, 0], rtol=1e-4, atol=1e-4)
    assert bb.metadata["layer"] == 7


def test_bf16_is_close_to_fp32(tiny):
    x = images()
    cls32, p32 = tiny(x)
    tiny.precision = "bf16"
    try:
        cls16, p16 = tiny(x)
    finally:
        tiny.precision = "fp32"
    cos = torch.nn.functional.cosine_similarity(p16.flatten(0, 1), p32.flatten(0, 1), dim=-1)
    assert cos.min() > 0.98


def test_register_tokens_keep_only_the_class_token():
    bb = load_backbone(BackboneSpec("vit_small_patch14_reg4_dinov2", image_size=28, pretrained=False), "cpu",
                       precision="fp32")
    x = images(2, 28)
    cls, patches = bb(x)
    assert bb.model.num_prefix_tokens == 5 and patches.shape == (2, 4, 384)
    with torch.no_grad():
        full = bb.model.forward_features(x)
    torch.testing.assert_close(cls, full[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(patches, full[:, 5:], rtol=1e-4, atol=1e-4)


def test_wrong_input_shape_is_refused(tiny):
    with pytest.raises(BackboneError, match=r"expects input \(n, 3, 64, 64\)"):
        tiny(images(1, 32))


def test_bad_settings_are_refused():
    with pytest.raises(BackboneError, match=r"--layer 12 is out of range: .* 12 blocks \(0\.\.11\)"):
        load_backbone(BackboneSpec(TINY, image_size=SIZE, layer=12, pretrained=False))
    with pytest.raises(BackboneError, match="timm has no model 'vit_nonexistent'"):
        load_backbone(BackboneSpec("vit_nonexistent"))
    with pytest.raises(BackboneError, match="multiple of the patch size"):
        load_backbone(BackboneSpec(TINY, image_size=40, pretrained=False))
    with pytest.raises(BackboneError, match="precision 'int8'"):
        load_backbone(BackboneSpec(TINY, image_size=SIZE, pretrained=False), precision="int8")


# --------------------------------------------------------------------------- weights


def _params_equal(bb, state: dict) -> None:
    own = bb.model.state_dict()
    for k, v in own.items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)


def test_timm_safetensors_file(tmp_path, tiny_state):
    state = {k: v + 0.5 for k, v in tiny_state.items()}  # differs from the random init
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    bb = load_backbone(BackboneSpec(TINY, weights=str(path), image_size=SIZE), precision="fp32")
    _params_equal(bb, state)
    assert bb.metadata["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert bb.metadata["weights"] == str(path.resolve())


def test_official_dino_checkpoint_layouts(tmp_path, tiny_state):
    teacher = {k: v + 1.0 for k, v in tiny_state.items()}
    student = {k: v - 1.0 for k, v in tiny_state.items()}
    head = {"head.mlp.0.weight": torch.zeros(4, 192), "head.last_layer.weight_g": torch.ones(1, 8)}
    full = {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()}, **head},
        "student": {**{f"module.backbone.{k}": v for k, v in student.items()}, **{f"module.{k}": v for k, v in head.items()}},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_base", patch_size=8),
    }
    torch.save(full, tmp_path / "dino_full_checkpoint.pth")
    bb = load_backbone(BackboneSpec(TINY, weights=str(tmp_path / "dino_full_checkpoint.pth"), image_size=SIZE))
    _params_equal(bb, teacher)  # the teacher, as DINO's own evaluation uses

    # the release file: plain timm-named keys (saved here in torch's legacy format, which cannot be mmapped)
    torch.save(teacher, tmp_path / "dino_pretrain.pth", _use_new_zipfile_serialization=False)
    bb = load_backbone(BackboneSpec(TINY, weights=str(tmp_path / "dino_pretrain.pth"), image_size=SIZE))
    _params_equal(bb, teacher)


def test_normalize_state_dict_strips_wrappers():
    t = torch.zeros(1)
    out = normalize_state_dict({"student": {"module.backbone.blocks.0.x": t, "module.head.y": t}}, "ckpt")
    assert list(out) == ["blocks.0.x"]
    with pytest.raises(BackboneError, match="entry 'epoch' is a int"):
        normalize_state_dict({"blocks.0.x": t, "epoch": 3}, "ckpt")


def test_weights_with_missing_key_are_refused(tmp_path, tiny_state):
    state = dict(tiny_state)
    del state["blocks.3.attn.qkv.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(BackboneError, match=r"partial\.safetensors does not fit .*blocks\.3\.attn\.qkv\.weight"):
        load_backbone(BackboneSpec(TINY, weights=str(tmp_path / "partial.safetensors"), image_size=SIZE))


def test_weights_with_a_wrong_tensor_shape_are_refused(tmp_path, tiny_state):
    state = {k: v for k, v in tiny_state.items()}
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(10, 192)
    save_file(state, str(tmp_path / "odd.safetensors"))
    with pytest.raises(BackboneError, match=r"odd\.safetensors does not fit .*size mismatch"):
        load_backbone(BackboneSpec(TINY, weights=str(tmp_path / "odd.safetensors"), image_size=SIZE))


def test_weights_of_another_architecture_name_the_file_and_both_models(tmp_path):
    torch.manual_seed(0)
    small = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0, img_size=SIZE, depth=4)
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(tmp_path / "small.safetensors"))
    with pytest.raises(BackboneError) as info:
        load_backbone(BackboneSpec(TINY, weights=str(tmp_path / "small.safetensors"), image_size=SIZE))
    msg = str(info.value)
    assert "small.safetensors does not fit vit_tiny_patch16_224" in msg
    assert "4 blocks of width 384 and 8-pixel patches" in msg and "12 blocks of width 192 and 16-pixel" in msg
    assert "vit_small_patch8_*" in msg and "size mismatch" not in msg and len(msg) < 500


def test_a_backbone_that_is_not_a_vit_is_refused_before_any_download(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # a download attempt would fail differently
    with pytest.raises(BackboneError, match=r"resnet18 is not a Vision Transformer.*ViT.*vit_base_patch8_224\.dino"):
        load_backbone(BackboneSpec("resnet18"))


def test_missing_or_unreadable_weights_file(tmp_path):
    with pytest.raises(BackboneError, match="does not exist; check the --weights path"):
        load_backbone(BackboneSpec(TINY, weights=str(tmp_path / "nope.pth")))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match=r"junk\.pth cannot be read as a PyTorch checkpoint"):
        load_backbone(BackboneSpec(TINY, weights=str(tmp_path / "junk.pth")))


def test_unreachable_hub_gives_the_offline_message_at_once(monkeypatch, tmp_path):
    """No network: the probe fails, offline mode is switched on, and the error comes in seconds."""
    import socket
    import time

    import huggingface_hub.constants as hf_constants

    from funad.pipelines import weights

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # a port that refuses connections (bound, never listening)
    port = listener.getsockname()[1]
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    seen = []
    real = weights.hub_reachable
    monkeypatch.setattr(weights, "hub_reachable", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    start = time.monotonic()
    with pytest.raises(BackboneError, match=r"cannot fetch the pretrained weights of vit_tiny.*offline.*--weights"):
        load_backbone(BackboneSpec(TINY, image_size=SIZE))
    assert seen == [False] and time.monotonic() - start < 10
    assert hf_constants.HF_HUB_OFFLINE is False  # offline mode is switched off again afterwards
    listener.close()


def test_offline_hub_error_suggests_weights_option(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    with pytest.raises(BackboneError, match=r"cannot fetch the pretrained weights of vit_tiny.*--weights FILE"):
        load_backbone(BackboneSpec(TINY, image_size=SIZE))


# --------------------------------------------------------------------------- pre-processing


def test_resize_is_scaled_to_the_crop():
    assert resize_for(224) == 256 and resize_for(392) == 448
    assert ImageTransform(224, (0, 0, 0), (1, 1, 1)).crop_box() == (16, 16, 240, 240)
    assert ImageTransform(392, (0, 0, 0), (1, 1, 1)).crop_box() == (28, 28, 420, 420)


def test_image_transform_matches_torchvision(tiny):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8))  # not square: squashed
    geometry = [transforms.Resize((resize_for(SIZE), resize_for(SIZE))), transforms.CenterCrop(SIZE),
                transforms.ToTensor(), transforms.Normalize(tiny.mean, tiny.std)]
    tf = image_transform(tiny)
    torch.testing.assert_close(tf(img), transforms.Compose(geometry)(img), rtol=0, atol=1e-5)
    grey = img.convert("L")  # grey input becomes RGB
    torch.testing.assert_close(tf(grey), transforms.Compose([transforms.Grayscale(3), *geometry])(grey),
                               rtol=0, atol=1e-5)
    # normalising the uint8 crop on the device gives the same numbers as the PIL path
    crop = torch.from_numpy(tf.crop(img).transpose(2, 0, 1).copy())[None]
    torch.testing.assert_close(tiny.normalize(crop)[0], tf(img), rtol=0, atol=1e-5)


def test_mask_follows_the_image_geometry():
    # a 100x50 mask whose right half is anomalous: after the squash to 73x73 and
    # the centre crop to 64, the anomalous columns are the right half of the crop
    m = np.zeros((50, 100), np.uint8)
    m[:, 50:] = 200
    out = MaskTransform(64)(Image.fromarray(m))
    assert out.shape == (64, 64) and out.dtype == np.uint8 and set(np.unique(out)) == {0, 1}
    cols = out.mean(axis=0)
    assert (cols[:31] == 0).all() and (cols[33:] == 1).all()
    # nearest resampling keeps it binary and the threshold is applied to grey values
    assert MaskTransform(64, threshold=127)(Image.fromarray((m // 2).astype(np.uint8))).sum() == 0
