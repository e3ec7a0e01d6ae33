"""`funad eval`: metrics, scores.csv, pictures and the table, from a tiny synthetic store."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import build_tiny_store
from funad import anomaly_map, cache, metrics
from funad.cli.eval_cmd import evaluate as eval_cmd
from funad.pipelines import evaluate as ev
from funad.pipelines import modeldir
from funad.pipelines.errors import ModelDirError, PipelineError
from funad.pipelines.fit import FitSpec, fit

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "image_f1_max")


def tree_hash(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> digest), plus the file list itself."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One store and three model dirs (kNN no-overlap, kNN overlap, FUN-AD), shared by the module's tests."""
    root = tmp_path_factory.mktemp("eval")
    store = build_tiny_store(root / "feats.zarr", n_train=6, n_test=10, grid=(3, 3), token_dim=8,
                             mask_size=(12, 12), preview_size=6)
    # The full bank (coreset_ratio=1): a 10% coreset of this tiny store keeps too few patches to be a clean check.
    fit(store, root / "knn_clean", FitSpec(method="knn", contamination=0.34, overlap=False, seed=1, coreset_ratio=1.0),
        device="cpu")
    fit(store, root / "knn_overlap", FitSpec(method="knn", contamination=0.34, overlap=True, seed=1), device="cpu")
    fit(store, root / "funad", FitSpec(method="funad", epochs=2, overrides=(("batch_size", 2),), seed=0),
        device="cpu")
    return root


def expected_metrics(model_dir: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics computed directly with funad.metrics on the model's test split; also (ids, image scores)."""
    model, info = modeldir.load_model_dir(model_dir)
    with cache.open(info.cache["path"]) as store:
        ids = info.test_ids
        feats = store.read_features(ids)
        patch = model.score_patches(feats)
        scores = model.score_images(feats)  # the estimator's own image score (re-weighted for kNN)
        maps = anomaly_map.patch_scores_to_maps(patch, store.grid, store.mask_size, sigma=4.0)
        labels = store.labels[ids].astype(int)
        masks = store.read_masks(ids)
    out = dict(metrics.image_metrics(labels, scores))
    out.update(metrics.pixel_metrics(masks, maps))
    out["aupro"] = metrics.aupro(masks, maps, fpr_limit=0.3)
    return out, ids, scores


def test_metrics_json_matches_funad_metrics(workdir, tmp_path):
    before = tree_hash(workdir / "knn_clean")
    result = ev.evaluate(workdir / "knn_clean", tmp_path / "report", device="cpu", pictures=False)
    assert tree_hash(workdir / "knn_clean") == before, "eval changed the model directory"

    doc = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert doc == result.metrics
    want, ids, _ = expected_metrics(workdir / "knn_clean")
    for key in METRIC_KEYS + ("image_f1_threshold",):
        assert doc[key] == pytest.approx(want[key], abs=1e-6), key
    assert doc["image_auroc"] > 0.9  # planted +4 patches are easy for kNN
    assert doc["selection"] == "final" and "warning" not in doc
    assert "TEST labels" in doc["f1_threshold_note"]

    info = modeldir.read_config(workdir / "knn_clean")
    counts = doc["counts"]
    assert counts["n_test"] == len(ids) == len(info.test_ids)
    assert counts["n_anomalous"] + counts["n_normal"] == counts["n_test"]
    assert counts["n_moved"] == len(info.moved_ids) == 2  # round(0.34 * 6 normal training images)
    assert doc["split"] == {"ratio": 0.34, "overlap": False, "seed": 1, "moved_ids": info.moved_ids.tolist(),
                            "moved_paths": info.contamination["moved_paths"]}
    assert doc["throughput"]["images_per_s"] > 0


def test_eval_reports_the_models_own_threshold_next_to_f1_max(workdir, tmp_path):
    doc = ev.evaluate(workdir / "knn_clean", tmp_path / "r", device="cpu", pictures=False).metrics
    own = modeldir.read_config(workdir / "knn_clean").raw["threshold"]
    _, _, scores = expected_metrics(workdir / "knn_clean")
    rows = list(csv.DictReader(open(tmp_path / "r" / "scores.csv")))
    labels = np.array([int(r["label"]) for r in rows])
    pred = scores >= own["image"]
    tp, fp, fn = int((pred & (labels == 1)).sum()), int((pred & (labels == 0)).sum()), int((~pred & (labels == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn)
    assert doc["precision_at_threshold"] == pytest.approx(precision)
    assert doc["recall_at_threshold"] == pytest.approx(recall)
    assert doc["f1_at_threshold"] <= doc["image_f1_max"] + 1e-9  # F1-max is chosen with the test labels
    assert "test labels" in doc["f1_max_note"]
    assert set(doc["model_threshold"]["candidates"]) == {"quantile", "otsu", "mad"}
    assert [int(r["prediction_at_model_threshold"]) for r in rows] == pred.astype(int).tolist()

    # pixels: "map >= the model's pixel threshold" against the masks, next to pixel F1-max (test labels)
    model, info = modeldir.load_model_dir(workdir / "knn_clean")
    with cache.open(info.cache["path"]) as store:
        ids = info.test_ids
        maps = anomaly_map.patch_scores_to_maps(model.score_patches(store.read_features(ids)), store.grid,
                                                store.mask_size, sigma=4.0)
        truth = store.read_masks(ids).ravel() > 0
    flagged = maps.ravel() >= own["pixel"]
    tp, fp = int((flagged & truth).sum()), int((flagged & ~truth).sum())
    assert doc["pixel_precision_at_threshold"] == pytest.approx(tp / (tp + fp) if tp + fp else 0.0)
    assert doc["pixel_recall_at_threshold"] == pytest.approx(tp / truth.sum())
    assert doc["pixel_f1_at_threshold"] <= doc["pixel_f1_max"] + 1e-9


def test_no_overlap_drops_moved_images_and_overlap_keeps_them(workdir, tmp_path):
    clean = ev.evaluate(workdir / "knn_clean", tmp_path / "a", device="cpu", pictures=False).metrics
    overlap = ev.evaluate(workdir / "knn_overlap", tmp_path / "b", device="cpu", pictures=False).metrics
    moved = set(clean["split"]["moved_ids"])
    assert moved and moved == set(overlap["split"]["moved_ids"])
    rows_clean = {int(r["index"]) for r in csv.DictReader(open(tmp_path / "a" / "scores.csv"))}
    rows_overlap = {int(r["index"]) for r in csv.DictReader(open(tmp_path / "b" / "scores.csv"))}
    assert not moved & rows_clean
    assert moved <= rows_overlap
    assert overlap["counts"]["n_test"] == clean["counts"]["n_test"] + len(moved)
    assert not list((tmp_path / "a").glob("*.png"))  # pictures=False


def test_scores_csv_rows_and_pictures(workdir, tmp_path):
    report = tmp_path / "report"
    doc = ev.evaluate(workdir / "knn_overlap", report, device="cpu", top_k=2).metrics
    _, ids, scores = expected_metrics(workdir / "knn_overlap")
    rows = list(csv.DictReader(open(report / "scores.csv")))
    assert len(rows) == doc["counts"]["n_test"] == len(ids)
    assert [int(r["index"]) for r in rows] == ids.tolist()
    np.testing.assert_allclose([float(r["score"]) for r in rows], scores, rtol=1e-5)
    thr = doc["image_f1_threshold"]
    assert [int(r["prediction_at_f1_max_threshold"]) for r in rows] == [int(s >= thr) for s in scores]
    assert {r["split"] for r in rows} <= {"train", "test"}

    assert len(list(report.glob("most-*.png"))) == 2
    assert len(list(report.glob("least-*.png"))) == 2
    assert (report / "overview.png").stat().st_size > 0
    # fp/fn pictures are those at the model's own (unlabelled) threshold, not at F1-max's
    own = doc["model_threshold"]["model_threshold"]
    assert len(list(report.glob("fp_*.png"))) == own["fp"]
    assert len(list(report.glob("fn_*.png"))) == own["fn"]
    assert [int(s >= own["threshold"]) for s in scores].count(1) == own["n_flagged"]


def test_oracle_selection_is_flagged(workdir, tmp_path):
    oracle = tmp_path / "oracle_model"
    shutil.copytree(workdir / "funad", oracle)
    config = json.loads((oracle / "config.json").read_text())
    config["selection"] = "oracle"
    (oracle / "config.json").write_text(json.dumps(config))
    doc = ev.evaluate(oracle, tmp_path / "r", device="cpu", pictures=False).metrics
    assert doc["selection"] == "oracle"
    assert "ORACLE" in doc["warning"] and "TEST labels" in doc["warning"]
    final = ev.evaluate(workdir / "funad", tmp_path / "f", device="cpu", pictures=False).metrics
    assert final["selection"] == "final" and "warning" not in final
    assert final["method"] == "funad"


def test_fingerprint_mismatch_names_both_caches(workdir, tmp_path):
    other = build_tiny_store(tmp_path / "other.zarr", n_train=6, n_test=10, attributes={"layer": 5})
    with pytest.raises(ModelDirError) as err:
        ev.evaluate(workdir / "knn_clean", tmp_path / "r", cache_path=other, device="cpu")
    msg = str(err.value)
    assert str(other) in msg and "knn_clean" in msg and "layer" in msg

    # Same backbone attributes and paths, other features: the checksums the model records catch it.
    other2 = build_tiny_store(tmp_path / "other2.zarr", n_train=7, n_test=10)
    with pytest.raises(ModelDirError, match="other features in cache .* than at the fit") as err:
        ev.evaluate(workdir / "knn_clean", tmp_path / "r", cache_path=other2, device="cpu")
    assert str(other2) in str(err.value) and str(workdir / "feats.zarr") in str(err.value)


def test_report_inside_model_dir_is_refused(workdir):
    before = tree_hash(workdir / "knn_clean")
    with pytest.raises(PipelineError, match="never writes into a model directory"):
        ev.evaluate(workdir / "knn_clean", workdir / "knn_clean" / "report", device="cpu")
    assert tree_hash(workdir / "knn_clean") == before


def test_cli_several_model_dirs_one_table_with_mean(workdir, tmp_path):
    dirs = [workdir / "knn_clean", workdir / "knn_overlap"]
    before = [tree_hash(d) for d in dirs]
    res = CliRunner(env={"COLUMNS": "160"}).invoke(
        eval_cmd, [*map(str, dirs), "-o", str(tmp_path / "rep"), "--device", "cpu", "--no-pictures"])
    assert res.exit_code == 0, res.output
    assert [tree_hash(d) for d in dirs] == before
    assert "mean" in res.output and "knn_clean" in res.output and "knn_overlap" in res.output
    assert "I-AUROC" in res.output and "P-AUROC" in res.output and "AUPRO" in res.output
    per = [json.loads((tmp_path / "rep" / d.name / "metrics.json").read_text()) for d in dirs]
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    for key in METRIC_KEYS:
        assert summary["mean"][key] == pytest.approx(np.mean([p[key] for p in per]))
        assert summary["std"][key] == pytest.approx(np.std([p[key] for p in per], ddof=1))
    assert "std" in res.output
    assert [r["name"] for r in summary["rows"]] == ["knn_clean", "knn_overlap"]


@pytest.mark.parametrize("args, suffix", [(["--save-maps"], ".npy"), (["--save-maps", "tiff"], ".tiff")])
def test_cli_save_maps_alone_means_npy_and_takes_tiff(workdir, tmp_path, args, suffix):
    res = CliRunner().invoke(eval_cmd, [str(workdir / "knn_clean"), "-o", str(tmp_path / "r"), "--device", "cpu",
                                        "--no-pictures", *args])
    assert res.exit_code == 0, res.output
    files = sorted((tmp_path / "r" / "maps").iterdir())
    n_test = len((tmp_path / "r" / "scores.csv").read_text().splitlines()) - 1  # the moved anomalies are left out
    assert len(files) == n_test > 0 and {f.suffix for f in files} == {suffix}


def test_cli_errors_are_clean(workdir, tmp_path):
    other = build_tiny_store(tmp_path / "other.zarr", n_train=7, n_test=10)
    res = CliRunner().invoke(eval_cmd, [str(workdir / "knn_clean"), "--cache", str(other), "-o",
                                        str(tmp_path / "r"), "--device", "cpu"])
    assert res.exit_code == 1
    assert "has other features in cache" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(eval_cmd, [str(tmp_path / "nope"), "-o", str(tmp_path / "r")])
    assert res.exit_code == 1 and "does not exist" in res.output


def test_store_without_previews_gives_metrics_but_no_pictures(tmp_path):
    store = build_tiny_store(tmp_path / "nopreview.zarr", n_train=6, n_test=6, preview_size=None)
    fit(store, tmp_path / "model", FitSpec(method="knn"), device="cpu")
    result = ev.evaluate(tmp_path / "model", tmp_path / "r", device="cpu")
    assert result.metrics["counts"]["n_test"] == 6
    assert (tmp_path / "r" / "metrics.json").is_file() and not list((tmp_path / "r").glob("*.png"))


def test_several_model_dirs_with_one_name_are_refused(workdir, tmp_path):
    twin = tmp_path / "elsewhere" / "knn_clean"
    shutil.copytree(workdir / "knn_clean", twin)
    with pytest.raises(PipelineError, match="share the name"):
        ev.evaluate_many([workdir / "knn_clean", twin], tmp_path / "r", device="cpu")


def test_eval_without_test_images_points_to_predict(tmp_path):
    from test_fit_pipeline import make_store

    store = make_store(tmp_path / "train_only.zarr", n_test_good=0, n_test_bad=0)  # a folder of training images
    fit(store, tmp_path / "m", FitSpec(epochs=1, overrides=(("batch_size", 4),)), device="cpu")
    res = CliRunner().invoke(eval_cmd, [str(tmp_path / "m"), "-o", str(tmp_path / "report"), "--device", "cpu"])
    assert res.exit_code != 0 and res.output.startswith("Error: ")
    assert "no test images" in res.output and f"funad predict {tmp_path / 'm'}" in res.output
