"""Store geometries: frames, tiles that cover every patch, maps back on the original pixels, settings checked."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from funad import cache, metrics
from funad.pipelines import extract as extract_mod
from funad.pipelines.backbone import BackboneSpec, image_transform, load_backbone, mask_transform
from funad.pipelines.errors import DatasetError
from funad.pipelines.evaluate import evaluate
from funad.pipelines.extract import extract
from funad.pipelines.fit import FitSpec, fit
from funad.pipelines.geometry import Geometry, as_stored
from funad.pipelines.tiles import embed, tile_boxes, tile_starts

TINY = BackboneSpec("vit_tiny_patch16_224", image_size=32, layer=1, pretrained=False)  # 16-px patches


# --------------------------------------------------------------------------- tiles


@pytest.mark.parametrize("length,tile,patch,overlap", [(80, 32, 16, 16), (994, 392, 14, 56), (392, 392, 14, 56),
                                                       (406, 392, 14, 56), (1400, 224, 8, 8), (48, 32, 16, 48)])
def test_tiles_cover_every_pixel_and_end_at_the_edge(length, tile, patch, overlap):
    starts = tile_starts(length, tile, patch, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length  # the last tile ends at the border
    assert all(s % patch == 0 for s in starts) and starts == sorted(set(starts))
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all()
    gaps = np.diff(starts)
    assert (tile - gaps >= min(overlap, tile - patch) - patch).all()  # overlaps kept, up to a patch of rounding


class PatchMeans:
    """A fake backbone: each patch token is its patch's mean pixel, the class token the tile's mean."""

    image_size, patch_size = 32, 16

    def normalize(self, images):
        return images.float()

    def __call__(self, x):
        assert x.shape[1:] == (3, 32, 32)
        n = x.shape[0]
        p = x.mean(dim=1).unfold(1, 16, 16).unfold(2, 16, 16).mean(dim=(3, 4))  # (n, 2, 2)
        return x.mean(dim=(1, 2, 3))[:, None].repeat(1, 4), p.reshape(n, 4, 1).repeat(1, 1, 4)


def test_stitched_tokens_are_each_patch_own_token_with_no_border_dropped():
    g = Geometry.full(32, 16, (100, 45))  # 45 x 100 image: frame 80 x 32, not a multiple of the tile
    assert g.frame == (80, 32) and g.grid == (5, 2) and len(tile_boxes(g)) == 4
    x = torch.randint(0, 255, (2, 3, *g.frame), dtype=torch.uint8)
    cls, patches = embed(PatchMeans(), x, g)
    expected = x.float().mean(dim=1).unfold(1, 16, 16).unfold(2, 16, 16).mean(dim=(3, 4)).reshape(2, -1)
    assert patches.shape == (2, 10, 4) and torch.isfinite(patches).all()
    torch.testing.assert_close(patches[..., 0], expected)  # overlaps averaged: the same token from every tile
    assert cls.shape == (2, 4)


def test_one_tile_is_the_plain_backbone_call():
    bb = load_backbone(TINY, "cpu", precision="fp32")
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    cls, patches = embed(bb, x, Geometry.paper(32, 16))
    ref_cls, ref_patches = bb(bb.normalize(x))
    assert torch.equal(cls, ref_cls) and torch.equal(patches, ref_patches)


# --------------------------------------------------------------------------- geometry round trips


@pytest.mark.parametrize("hw", [(37, 53), (1263, 500), (101, 99), (64, 64)])
def test_full_maps_go_back_to_the_original_size_and_match_the_mask(hw):
    g = Geometry.full(32, 16, (40, 70))  # one frame for every image; other shapes are padded
    rng = np.random.default_rng(0)
    mask = np.zeros(hw, np.uint8)
    mask[hw[0] // 4:hw[0] // 2 + 3, hw[1] // 3:hw[1] // 3 + max(6, hw[1] // 3)] = 255
    framed = g.crop_mask(Image.fromarray(mask)).astype(np.float32)
    back = g.to_original(framed, hw)
    assert back.shape == hw and not np.isnan(back).any()
    inter = ((back > 0.5) & (mask > 0)).sum()
    union = ((back > 0.5) | (mask > 0)).sum()
    assert inter / union > 0.6  # a coarse frame, but the region is where it was
    const = np.full(g.frame, 3.0, np.float32) + rng.normal(0, 0, g.frame).astype(np.float32)
    assert np.allclose(g.to_original(const, hw), 3.0)


def test_full_crop_keeps_the_aspect_ratio_and_pads_with_the_edge():
    g = Geometry.full(32, 16, (40, 70))
    assert g.frame == (32, 64)  # 40 x 70 -> 32 x 56, long side rounded up to whole patches
    img = np.zeros((40, 70, 3), np.uint8)
    img[:, -1] = 200
    framed = g.crop(Image.fromarray(img))
    pl = g.placement((40, 70))
    assert framed.shape == (32, 64, 3) and (pl.valid_h, pl.valid_w) == (32, 56)
    assert (framed[:, 56:] == framed[:, 55:56]).all()  # padding repeats the last column


def test_paper_geometry_equals_the_old_transform_and_leaves_the_border_unscored():
    g = Geometry.paper(392, 14)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 451, 3), dtype=np.uint8))
    bb = type("B", (), {"image_size": 392, "mean": (0, 0, 0), "std": (1, 1, 1)})()
    assert np.array_equal(g.crop(img), image_transform(bb).crop(img))
    m = Image.fromarray((np.arange(300 * 451).reshape(300, 451) % 7 == 0).astype(np.uint8) * 255)
    assert np.array_equal(g.crop_mask(m), mask_transform(bb)(m))
    back = g.to_original(np.ones((392, 392), np.float32), (300, 451))
    share = np.isnan(back).mean()
    assert back.shape == (300, 451) and abs(share - (1 - (392 / 448) ** 2)) < 0.01  # the ~23% border
    assert not np.isnan(back[150, 225])


def test_an_image_too_small_for_the_frame_is_named():
    g = Geometry.full(32, 16, (100, 100))
    with pytest.raises(DatasetError, match=r"strip\.png .* less than one 16-pixel patch"):
        g.crop(Image.new("RGB", (1000, 10)), "strip.png")


def test_stores_without_a_geometry_are_paper():
    old = {"image_size": 392, "grid": [28, 28], "resize": 448, "crop": 392}
    assert Geometry.from_attrs(old) == Geometry.paper(392, 14)
    requested = {"geometry": "paper", "frame": None, "tile_overlap": None, "grid": [28, 28]}
    assert as_stored(requested, old) == {"grid": [28, 28]}
    assert as_stored({"geometry": "full"}, old) == {"geometry": "full"}


def test_pixel_metrics_take_images_of_different_sizes():
    rng = np.random.default_rng(0)
    masks = [(rng.random((9, 7)) > 0.8).astype(np.uint8) for _ in range(3)]
    maps = [rng.random((9, 7)).astype(np.float32) + m for m in masks]
    same = metrics.pixel_metrics(np.stack(masks), np.stack(maps))
    assert metrics.pixel_metrics(masks, maps) == same
    assert metrics.aupro(masks, maps) == metrics.aupro(np.stack(masks), np.stack(maps))
    masks.append(np.zeros((4, 11), np.uint8))
    maps.append(np.zeros((4, 11), np.float32))
    assert 0.5 < metrics.pixel_metrics(masks, maps)["pixel_auroc"] <= 1.0


# --------------------------------------------------------------------------- extract, resume, eval


def write_dataset(root: Path) -> Path:
    """MVTec-like, every image 45 x 100 (w x h; not a multiple of the 32-px tile) except one 52 x 97."""
    rng = np.random.default_rng(0)

    def img(path, size=(45, 100), defect=False):
        path.parent.mkdir(parents=True, exist_ok=True)
        a = rng.integers(80, 120, (size[1], size[0], 3), dtype=np.uint8)
        if defect:
            a[-12:, -10:] = 255  # in the bottom corner: outside a paper crop
        Image.fromarray(a).save(path)

    for i in range(5):
        img(root / "train/good" / f"{i:03d}.png")
    img(root / "test/good/000.png", size=(52, 97))
    for i in range(2):
        img(root / "test/spot" / f"{i:03d}.png", defect=True)
        m = np.zeros((100, 45), np.uint8)
        m[-12:, -10:] = 255
        (root / "ground_truth/spot").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(root / "ground_truth/spot" / f"{i:03d}_mask.png")
    return root


def test_default_geometry_is_full_for_a_new_store_and_the_stored_one_after(tmp_path):
    """--geometry auto (the default): a new store scores the whole image; an existing store, e.g. one made with
    the paper geometry when that was the default, resumes and grows in its own geometry."""
    data = write_dataset(tmp_path / "data")
    run = dict(backbone=TINY, precision="fp32", device="cpu", num_workers=0)
    extract(data, tmp_path / "new.zarr", **run)
    with cache.open(tmp_path / "new.zarr") as store:
        assert store.attrs["geometry"] == "full" and store.attrs["crop"] is None
    old = tmp_path / "old.zarr"
    extract(data, old, geometry="paper", **run)
    Image.fromarray(np.full((100, 45, 3), 100, np.uint8)).save(data / "train/good/100.png")
    result = extract(data, old, **run)
    assert (result.written, result.already) == (1, 8)
    with cache.open(old) as store:
        assert store.attrs["geometry"] == "paper" and store.grid == (2, 2) and store.complete.all()


def test_an_unreadable_image_is_named_by_the_extraction_in_the_full_frame_too(tmp_path):
    data = write_dataset(tmp_path / "data")
    (data / "train/good/002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    run = dict(backbone=TINY, precision="fp32", device="cpu", num_workers=0, geometry="full")
    with pytest.raises(DatasetError, match=r"train/good/002\.png .*--skip-bad"):
        extract(data, tmp_path / "stop.zarr", **run)
    result = extract(data, tmp_path / "skip.zarr", skip_bad=True, **run)
    assert (result.written, result.skipped) == (7, 1)


def test_full_geometry_is_recorded_checked_and_evaluated_at_the_original_size(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "full.zarr"
    extract(data, out, backbone=TINY, precision="fp32", device="cpu", geometry="full", num_workers=0)
    with cache.open(out) as store:
        assert store.attrs["geometry"] == "full" and store.attrs["frame"] == [80, 32]
        assert store.grid == (5, 2) and store.mask_size == (80, 32) and store.attrs["crop"] is None
        assert store.read_masks(store.indices("test")).sum() > 0

    def no_backbone(*a, **k):
        raise AssertionError("the backbone was loaded before the geometry was checked")

    monkeypatch.setattr(extract_mod, "load_backbone", no_backbone)
    with pytest.raises(cache.CacheMismatchError, match="geometry: store has 'full', this run asks for 'paper'"):
        extract(data, out, backbone=TINY, precision="fp32", device="cpu", geometry="paper")
    monkeypatch.undo()

    fit(out, tmp_path / "model", FitSpec(method="knn"), device="cpu")
    result = evaluate(tmp_path / "model", tmp_path / "report", device="cpu", save_maps=True, top_k=1)
    record = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert record["map_size"] == "original" and record["unscored_pixel_share"] == 0.0
    assert set(record["pixel_metrics_at_input_size"]) == {"pixel_auroc", "pixel_ap", "aupro"}
    assert result.metrics["pixel_auroc"] == record["pixel_auroc"]
    saved = np.load(tmp_path / "report" / "maps" / "test-good-000.npy")
    assert saved.shape == (97, 52) and saved.dtype == np.float32  # the odd-sized original, not the frame
    assert np.load(tmp_path / "report" / "maps" / "test-spot-001.npy").shape == (100, 45)

    # sweep measures a cell at the original size exactly as eval does (same split, same kNN)
    from funad.pipelines.sweep import parse_methods, sweep

    rows = sweep(out, tmp_path / "sweep", ratios=[0.0], overlap="no-overlap", methods=parse_methods("knn"),
                 device="cpu")
    assert rows[0]["map_size"] == "original"
    assert float(rows[0]["pixel_auroc_original"]) == pytest.approx(record["pixel_auroc"], abs=1e-9)
    assert float(rows[0]["pixel_auroc"]) == pytest.approx(record["pixel_metrics_at_input_size"]["pixel_auroc"], abs=1e-9)
    assert "at the original images' size" in (tmp_path / "sweep" / "results.md").read_text()
    assert float(rows[0]["pixel_f1_at_thr"]) == pytest.approx(record["pixel_f1_at_threshold"], abs=1e-9)
    assert float(rows[0]["pixel_f1_max"]) == pytest.approx(record["pixel_f1_max"], abs=1e-9)

    # predict tiles and stitches raw images as extract did: the same scores, maps and pictures on the originals
    from funad.pipelines.predict import predict

    scores = {r["path"]: float(r["score"]) for r in csv.DictReader(open(tmp_path / "report" / "scores.csv"))}
    images = [data / "test/good/000.png", data / "test/spot/001.png"]
    out = predict(tmp_path / "model", images, tmp_path / "pred", device="cpu", workers=0, heatmaps="npy")
    for im, r in zip(images, out.records):
        assert r["score"] == pytest.approx(scores[im.relative_to(data).as_posix()], rel=1e-4)
        with Image.open(im) as pil:
            assert np.load(tmp_path / "pred" / r["map"]).shape == (pil.size[1], pil.size[0])
    # the same maps as 32-bit float TIFFs, bit for bit
    tif = predict(tmp_path / "model", images, tmp_path / "tiff", device="cpu", workers=0, heatmaps="tiff")
    for a, b in zip(out.records, tif.records):
        assert b["map"].endswith(".tiff")
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "tiff" / b["map"])),
                                      np.load(tmp_path / "pred" / a["map"]))
    evaluate(tmp_path / "model", tmp_path / "report_tiff", device="cpu", save_maps="tiff", top_k=0, pictures=False)
    with Image.open(tmp_path / "report_tiff" / "maps" / "test-good-000.tiff") as t:
        assert t.mode == "F"
        np.testing.assert_array_equal(np.asarray(t), saved)
    png = predict(tmp_path / "model", images[1:], tmp_path / "png", device="cpu", workers=0, heatmaps="png")
    assert Image.open(tmp_path / "png" / png.records[0]["heatmap"]).size[1] >= 100  # drawn on the 45 x 100 original
