"""A model fitted before its cache grew evaluates on exactly its old split afterwards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import build_tiny_store
from funad import cache
from funad.pipelines import evaluate as ev
from funad.pipelines import modeldir
from funad.pipelines.errors import ModelDirError, PipelineError
from funad.pipelines.fit import FitSpec, fit

NEW = [{"path": f"test/{kind}/new{i}.png", "split": "test", "label": int(kind == "defect"), "defect_type": kind}
       for i, kind in enumerate(("good", "defect"))] + [
    {"path": "train/good/new.png", "split": "train", "label": 0, "defect_type": "good"}]


def _grow(path, rng):
    """Append three images (two test, one train) with features of their own."""
    with cache.grow(cache.open(path, "a"), add=NEW) as store:
        n = store.n_images
        p, c = store.n_patches, store.token_dim
        store.write_batch(np.arange(n - 3, n), patch_tokens=rng.normal(size=(3, p, c)) + 3.0,
                          class_tokens=rng.normal(size=(3, c)),
                          previews=np.zeros((3, *store.preview_size, 3), np.uint8))


@pytest.mark.parametrize("name", ["feats.zarr", "feats.h5"])
def test_a_model_fitted_before_the_growth_evaluates_the_same(tmp_path, name):
    store = build_tiny_store(tmp_path / name, n_train=6, n_test=8)
    fit(store, tmp_path / "knn", FitSpec(method="knn", contamination=0.34, overlap=False, seed=1, coreset_ratio=1.0),
        device="cpu")
    info = modeldir.read_config(tmp_path / "knn")
    table = info.raw["sample_table"]
    assert table["n_images_in_cache"] == 14 and table["n_rows"] == 14 and len(table["digest"]) == 64
    assert {r[1] for r in table["rows"]} == set(info.contamination["train_paths"]) | set(
        info.contamination["test_paths"]) | set(info.contamination["moved_paths"])
    before = ev.evaluate(tmp_path / "knn", tmp_path / "r1", device="cpu", pictures=False).metrics
    assert before["sample_table"]["found_by"] == "id"

    _grow(store, np.random.default_rng(5))
    after = ev.evaluate(tmp_path / "knn", tmp_path / "r2", device="cpu", pictures=False).metrics
    note = after["sample_table"]
    assert note["found_by"] == "path" and (note["cache_images_at_fit"], note["cache_images_now"]) == (14, 17)
    assert note["added_test_images_not_evaluated"] == 2 and note["digest"] == table["digest"]
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max"):
        assert after[key] == before[key], key
    assert after["counts"] == before["counts"]
    assert (tmp_path / "r1/scores.csv").read_text() == (tmp_path / "r2/scores.csv").read_text()

    # a re-fit takes the new images in: its split differs from the old model's
    fit(store, tmp_path / "knn2", FitSpec(method="knn", contamination=0.34, overlap=False, seed=1, coreset_ratio=1.0),
        device="cpu")
    refit = modeldir.read_config(tmp_path / "knn2").raw["sample_table"]
    assert refit["n_rows"] == 17 and refit["digest"] != table["digest"]


def test_pruned_or_changed_images_of_the_split_are_refused(tmp_path):
    store = build_tiny_store(tmp_path / "feats.zarr", n_train=6, n_test=8)
    fit(store, tmp_path / "knn", FitSpec(method="knn", coreset_ratio=1.0), device="cpu")
    test_path = modeldir.read_config(tmp_path / "knn").contamination["test_paths"][0]
    with cache.open(store) as s:
        victim = int(np.flatnonzero(s.paths == test_path)[0])
        feats = s.read_features([victim])[0]

    # the same image extracted again with other values (another cache, a re-extraction): refused by name
    with cache.grow(cache.open(store, "a"), add=NEW[:1]) as s:
        c = s.token_dim
        s.write(victim, patch_tokens=feats[:, c:].astype(np.float32) + 1.0, class_token=feats[0, :c],
                preview=np.zeros((*s.preview_size, 3), np.uint8))
    with pytest.raises(ModelDirError, match=f"image {test_path} of model .* has other features"):
        ev.evaluate(tmp_path / "knn", tmp_path / "r", device="cpu", pictures=False)

    with cache.grow(cache.open(store, "a"), drop=[victim]) as s:
        assert test_path not in s.paths.tolist()
    with pytest.raises(ModelDirError, match=r"no longer holds 1 test images of model .*split \(e\.g\. "
                                            f"{test_path}\\).*--prune-missing"):
        ev.evaluate(tmp_path / "knn", tmp_path / "r", device="cpu", pictures=False)


def test_pruned_training_images_are_counted_and_the_test_split_evaluated(tmp_path):
    store = build_tiny_store(tmp_path / "feats.zarr", n_train=6, n_test=8)
    fit(store, tmp_path / "knn", FitSpec(method="knn", coreset_ratio=1.0), device="cpu")
    before = ev.evaluate(tmp_path / "knn", tmp_path / "r1", device="cpu", pictures=False).metrics
    with cache.grow(cache.open(store, "a"), drop=[0, 1]) as s:  # two training images, pruned
        assert s.n_images == 12
    after = ev.evaluate(tmp_path / "knn", tmp_path / "r2", device="cpu", pictures=False).metrics
    assert after["sample_table"]["split_training_images_gone"] == 2
    assert after["image_auroc"] == before["image_auroc"] and after["pixel_auroc"] == before["pixel_auroc"]
    rows1 = (tmp_path / "r1/scores.csv").read_text().splitlines()[1:]
    rows2 = (tmp_path / "r2/scores.csv").read_text().splitlines()[1:]
    assert [r.split(",", 1)[1] for r in rows1] == [r.split(",", 1)[1] for r in rows2]  # ids shift by 2, rows do not


def test_resuming_a_fit_on_a_grown_cache_is_refused(tmp_path):
    store = build_tiny_store(tmp_path / "feats.zarr", n_train=6, n_test=4)
    spec = FitSpec(method="funad", epochs=1, overrides=(("batch_size", 2),), seed=0)
    fit(store, tmp_path / "m", spec, device="cpu", keep_checkpoint=True)
    _grow(store, np.random.default_rng(1))
    with pytest.raises(PipelineError, match=r"cache .* changed since this fit started \(10 -> 13 images"):
        fit(store, tmp_path / "m", FitSpec(method="funad", epochs=2, overrides=(("batch_size", 2),), seed=0),
            device="cpu", resume=True)
    assert json.loads((tmp_path / "m/config.json").read_text())["complete"] is True
