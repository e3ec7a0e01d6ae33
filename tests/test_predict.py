"""`funad predict`: raw images -> scores and heatmaps, with a tiny randomly initialised ViT."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from funad import cache
from funad.cli.predict_cmd import predict as predict_cmd
from funad.pipelines import modeldir
from funad.pipelines.backbone import BackboneSpec
from funad.pipelines.errors import BackboneError, DatasetError, PipelineError
from funad.pipelines.extract import extract
from funad.pipelines.fit import FitSpec, fit
from funad.pipelines import overlay
from funad.pipelines.predict import collect_images, predict

SHARED = Path(__file__).resolve().parents[2] / "shared"
# A tiny random ViT: 32 px input, 16 px patches -> 2x2 grid, C = 192; block 1 keeps it cheap.
SPEC = BackboneSpec(name="vit_tiny_patch16_224", image_size=32, layer=1, pretrained=False)


def write_images(folder: Path, n: int, seed: int, size=(48, 40), bright_square: bool = False) -> list[Path]:
    """``n`` smooth random RGB PNGs (W x H = size); ``bright_square`` paints a white block in each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(60, 120, size=(4, 4, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize(size, Image.BILINEAR)).copy()
        if bright_square:
            img[10:26, 12:30] = 255
        paths.append(folder / f"img_{i:02d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A kNN model dir fitted on features extracted from 6 synthetic images, plus new images to score."""
    root = tmp_path_factory.mktemp("predict")
    write_images(root / "train", 6, seed=0)
    extract(root / "train", root / "train.zarr", dataset="folder", backbone=SPEC, device="cpu", batch_size=4,
            precision="fp32", num_workers=0)
    fit(root / "train.zarr", root / "model", FitSpec(method="knn"), device="cpu")
    new = write_images(root / "new", 3, seed=1) + write_images(root / "new_bad", 1, seed=2, bright_square=True)
    # One run without a threshold, with heatmaps, shared by the tests that only read its outputs.
    baseline = predict(root / "model", [root / "new", root / "new_bad"], root / "out", device="cpu", batch_size=2,
                       workers=0)
    return {"root": root, "model": root / "model", "new": new, "baseline": baseline}


def test_scores_equal_extract_then_score(setup, tmp_path):
    """predict pre-processes exactly as extract: its scores equal the model's scores of extracted features."""
    result = setup["baseline"]
    assert [r["path"] for r in result.records] == [str(p) for p in setup["new"]]
    got = np.array([r["score"] for r in result.records])

    ref_data = tmp_path / "ref"
    for p in setup["new"]:
        ref_data.mkdir(exist_ok=True)
        shutil.copy(p, ref_data / f"{p.parent.name}_{p.name}")
    extract(ref_data, tmp_path / "ref.zarr", dataset="folder", backbone=SPEC, device="cpu", batch_size=4,
            precision="fp32", num_workers=0)
    model, _ = modeldir.load_model_dir(setup["model"])
    with cache.open(tmp_path / "ref.zarr") as store:
        want = model.score_images(store.read_features(np.arange(store.n_images)))
        by_name = dict(zip([s["path"] for s in store.samples], want))
    expected = [by_name[f"{p.parent.name}_{p.name}"] for p in setup["new"]]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert got[3] > got[:3].max()  # the image with a white block is the most anomalous


def test_outputs_at_the_models_own_threshold(setup):
    out, result = setup["root"] / "out", setup["baseline"]
    doc = json.loads((out / "scores.json").read_text())
    own = json.loads((setup["model"] / "config.json").read_text())["threshold"]
    assert doc["threshold"] == own["image"] and "own threshold" in doc["threshold_source"]
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert list(rows[0]) == ["path", "output", "score", "normalised_score", "is_anomalous", "heatmap", "map", "error"]
    assert len(rows) == 4
    for r in rows:  # the normalised score puts the threshold at 0.5 and agrees with the decision
        assert int(r["is_anomalous"]) == int(float(r["score"]) >= own["image"])
        assert (float(r["normalised_score"]) >= 0.5) == bool(int(r["is_anomalous"]))
    pngs = sorted((out / "heatmaps").rglob("*.png"))
    assert len(pngs) == 4 and sorted(out / r["heatmap"] for r in doc["images"]) == pngs
    assert [r["output"] for r in rows] == ["new/img_00", "new/img_01", "new/img_02", "new_bad/img_00"]
    assert doc["throughput"]["images_per_s"] > 0
    assert result.n_errors == 0


def test_threshold_override_and_out_of_range(setup, tmp_path):
    scores = [r["score"] for r in setup["baseline"].records]
    thr = float(np.median(scores))
    out = tmp_path / "b"
    predict(setup["model"], [setup["root"] / "new", setup["root"] / "new_bad"], out, threshold=thr, device="cpu",
            workers=0, heatmaps="none")
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [int(r["is_anomalous"]) for r in rows] == [int(s >= thr) for s in scores]
    assert not (out / "heatmaps").exists() and not (out / "maps").exists()
    own = json.loads((setup["model"] / "config.json").read_text())["threshold"]
    hi = own["training_scores"]["image"]["max"]
    for bad in (hi * 10 + 1, -1.0):
        with pytest.raises(PipelineError, match="outside the range of model .* training scores"):
            predict(setup["model"], [setup["root"] / "new"], tmp_path / f"c{bad}", threshold=bad, device="cpu",
                    workers=0, heatmaps="none")
    assert not (tmp_path / f"c{-1.0}").exists()  # refused before anything is written


def test_recursion_mirrors_subfolders_and_npy_maps(setup, tmp_path):
    data = tmp_path / "line"
    shutil.copytree(setup["root"] / "new", data / "day1" / "cam_a")
    shutil.copy(setup["new"][3], data / "day1" / "top.png")
    (data / ".hidden").mkdir()
    shutil.copy(setup["new"][0], data / ".hidden" / "skip.png")
    result = predict(setup["model"], [data], tmp_path / "o", device="cpu", workers=0, heatmaps="npy")
    names = [r["output"] for r in result.records]
    assert names == ["line/day1/cam_a/img_00", "line/day1/cam_a/img_01", "line/day1/cam_a/img_02", "line/day1/top"]
    m = np.load(tmp_path / "o" / "maps" / "line" / "day1" / "cam_a" / "img_01.npy")
    info = modeldir.read_config(setup["model"])
    with Image.open(data / "day1" / "cam_a" / "img_01.png") as im:  # the map lies on the original's pixels
        assert m.dtype == np.float32 and m.shape == (im.size[1], im.size[0]) != tuple(info.mask_size)
    assert not (tmp_path / "o" / "heatmaps").exists()


def test_non_empty_output_is_refused_and_overwrite_clears_only_funads_files(setup, tmp_path):
    out = tmp_path / "o"
    predict(setup["model"], [setup["root"] / "new", setup["root"] / "new_bad"], out, device="cpu", workers=0)
    (out / "my_notes.txt").write_text("keep me")
    before = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert Path("heatmaps/new_bad/img_00.png") in before
    with pytest.raises(PipelineError, match="not empty.*--overwrite"):
        predict(setup["model"], [setup["root"] / "new"], out, device="cpu", workers=0)
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == before  # untouched
    predict(setup["model"], [setup["root"] / "new"], out, device="cpu", workers=0, overwrite=True)
    after = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert (out / "my_notes.txt").read_text() == "keep me"
    assert not (out / "heatmaps" / "new_bad").exists()  # the stale run's pictures are gone
    assert len(list((out / "heatmaps").rglob("*.png"))) == 3
    assert len(json.loads((out / "scores.json").read_text())["images"]) == 3
    assert Path("my_notes.txt") in after

    # An interrupted run (its manifest names the folders it created, not yet its files) is cleared as well.
    manifest = json.loads((out / ".funad-predict.json").read_text())
    (out / ".funad-predict.json").write_text(json.dumps({**manifest, "complete": False, "files": []}))
    (out / "heatmaps" / "new" / "half_written.png").write_bytes(b"")
    predict(setup["model"], [setup["root"] / "new_bad"], out, device="cpu", workers=0, overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*.png")) == [Path("heatmaps/new_bad/img_00.png")]
    assert (out / "my_notes.txt").read_text() == "keep me"


def test_heatmap_colours_are_fixed_by_the_threshold(setup, tmp_path):
    """The same image gets the same picture whatever else is in the run (no per-run min-max)."""
    one = predict(setup["model"], [setup["new"][0]], tmp_path / "one", device="cpu", workers=0)
    many = predict(setup["model"], [setup["root"] / "new", setup["root"] / "new_bad"], tmp_path / "many",
                   device="cpu", workers=0)
    a = np.asarray(Image.open(tmp_path / "one" / one.records[0]["heatmap"]))
    b = np.asarray(Image.open(tmp_path / "many" / many.records[0]["heatmap"]))
    assert a.shape == b.shape
    np.testing.assert_array_equal(a[overlay.HEADER:], b[overlay.HEADER:])  # panels identical (headers name the file)


def test_overlay_scale_puts_the_threshold_in_the_middle():
    assert overlay.lut().shape == (256, 3)
    norm = np.linspace(0, 1, 64, dtype=np.float32)[None].repeat(8, axis=0)
    rgb = np.zeros((8, 64, 3), np.uint8)
    out = overlay.overlay(rgb, norm)
    edge = overlay.threshold_edge(norm)
    assert edge[:, 32].all() and edge.sum() == 8  # the outline sits where the map reaches 0.5
    np.testing.assert_array_equal(overlay.colourise(np.array([0.5])), overlay.lut()[[128]])
    assert (out[:, 0] != out[:, -1]).any()
    pic = overlay.two_panel(rgb, norm, "x", anomalous=True)
    assert pic.size[1] == 8 + overlay.HEADER + 4


def test_corrupt_and_missing_images_are_recorded_unless_strict(setup, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(setup["root"] / "new", folder)
    (folder / "img_01.png").write_bytes(b"this is not a png")
    missing = tmp_path / "missing.png"
    result = predict(setup["model"], [folder, missing], tmp_path / "out", device="cpu", workers=0, heatmaps=False)
    by_path = {r["path"]: r for r in result.records}
    assert by_path[str(folder / "img_01.png")]["score"] is None
    assert "cannot read image" in by_path[str(folder / "img_01.png")]["error"]
    assert by_path[str(missing)]["score"] is None and "no such file" in by_path[str(missing)]["error"]
    assert by_path[str(folder / "img_00.png")]["score"] is not None
    assert by_path[str(folder / "img_02.png")]["score"] is not None
    assert result.n_errors == 2
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / "out" / "scores.csv"))}
    assert rows[str(folder / "img_01.png")]["error"] and rows[str(folder / "img_01.png")]["score"] == ""

    with pytest.raises(DatasetError, match="img_01.png"):
        predict(setup["model"], [folder], tmp_path / "strict", device="cpu", workers=0, strict=True)
    with pytest.raises(DatasetError, match="missing.png"):
        predict(setup["model"], [setup["root"] / "new", missing], tmp_path / "strict2", device="cpu", strict=True)


def test_class_token_model_scores_each_image_by_its_class_token(setup, tmp_path, caplog):
    """A --tokens class model: predict scores the class token (as fit saw it) and writes no map."""
    root = setup["root"]
    fit(root / "train.zarr", tmp_path / "cls", FitSpec(method="knn", tokens="class", coreset_ratio=1.0), device="cpu")
    train = sorted((root / "train").glob("*.png"))
    with caplog.at_level("WARNING"):
        out = predict(tmp_path / "cls", train, tmp_path / "o", device="cpu", batch_size=4, workers=0)
    assert "class tokens alone" in caplog.text
    model, _ = modeldir.load_model_dir(tmp_path / "cls")
    with cache.open(root / "train.zarr") as store:
        by_path = {s["path"]: i for i, s in enumerate(store.samples)}
        ids = np.array([by_path[p.name] for p in train])
        want = model.score_images(store.read_class_tokens(ids).astype(np.float32)[:, None, :])
    np.testing.assert_allclose([r["score"] for r in out.records], want, rtol=1e-4, atol=1e-5)
    assert all(r.get("heatmap") is None and r.get("map") is None for r in out.records)
    assert not (tmp_path / "o" / "heatmaps").exists()


def test_empty_folder_is_an_error(setup, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="empty.*no image files"):
        predict(setup["model"], [empty], tmp_path / "out", device="cpu")
    images, problems = collect_images([empty, setup["root"] / "new"])
    assert len(images) == 3 and problems[0][0] == empty and images[0].path.parent == setup["root"] / "new"


def test_weights_with_other_sha256_are_refused(setup, tmp_path):
    fake = tmp_path / "other.safetensors"
    fake.write_bytes(b"not the weights the model was fitted with")
    with pytest.raises(BackboneError, match="sha256"):
        predict(setup["model"], [setup["root"] / "new"], tmp_path / "out", device="cpu", weights=fake)


def test_cli(setup, tmp_path):
    runner = CliRunner(env={"COLUMNS": "160"})
    res = runner.invoke(predict_cmd, [str(setup["model"]), str(setup["root"] / "new_bad"), "-o", str(tmp_path / "o"),
                                      "--device", "cpu", "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert "images/s" in res.output and "img_00.png" in res.output and "anomalous at threshold" in res.output
    res = runner.invoke(predict_cmd, [str(setup["model"]), str(setup["root"] / "new_bad"), "-o", str(tmp_path / "o"),
                                      "--device", "cpu", "--workers", "0"])
    assert res.exit_code == 1 and "not empty" in res.output and "Traceback" not in res.output
    res = runner.invoke(predict_cmd, [str(setup["model"]), str(setup["root"] / "new_bad"), "-o", str(tmp_path / "o"),
                                      "--device", "cpu", "--workers", "0", "--threshold", "1e9", "--overwrite"])
    assert res.exit_code == 1 and "outside the range" in res.output and "Traceback" not in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(predict_cmd, [str(setup["model"]), str(empty), "-o", str(tmp_path / "o2")])
    assert res.exit_code == 1 and "no image files" in res.output and "Traceback" not in res.output


@pytest.mark.realdata
def test_real_bottle_images_with_offline_weights(tmp_path):
    data, weights = SHARED / "data" / "mvtec_ad" / "bottle", SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus.safetensors"
    if not (data.is_dir() and weights.is_file()):
        pytest.skip(f"{SHARED} has no MVTec AD bottle data or offline weights")
    train = tmp_path / "train"
    train.mkdir()
    for name in ("000.png", "001.png", "002.png", "003.png"):
        shutil.copy(data / "train" / "good" / name, train / name)
    spec = BackboneSpec(name="vit_small_patch14_dinov2", weights=str(weights), layer=7, image_size=392)
    extract(train, tmp_path / "bottle.zarr", dataset="folder", backbone=spec, device="cpu", batch_size=4,
            precision="bf16", num_workers=0)
    fit(tmp_path / "bottle.zarr", tmp_path / "model", FitSpec(method="knn"), device="cpu")
    good, broken = data / "test" / "good" / "000.png", data / "test" / "broken_large" / "000.png"
    result = predict(tmp_path / "model", [good, broken], tmp_path / "out", device="cpu", workers=0,
                     weights=weights)
    scores = {Path(r["path"]).parent.name: r["score"] for r in result.records}
    assert scores["broken_large"] > scores["good"]
    assert len(list((tmp_path / "out" / "heatmaps").rglob("*.png"))) == 2
