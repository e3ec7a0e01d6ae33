"""Unlabelled thresholds: the rules (funad.threshold), kNN's held-out training scores, and the fit's record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from funad import threshold as T
from funad.cli.fit_cmd import fit as fit_cmd
from funad.errors import ConfigError, DataError
from funad.knn import KNNScorer
from funad.softpatch import SoftPatchScorer

from test_fit_pipeline import make_store


def _contaminated(n_normal=200, n_bad=20, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(1.0, 0.1, n_normal), rng.normal(3.0, 0.2, n_bad)])


def test_quantile_flags_the_expected_share():
    s = np.arange(1000, dtype=np.float64)
    t = T.quantile_threshold(s, 0.1)
    assert (s >= t).sum() == pytest.approx(100, abs=1)


def test_mad_is_robust_to_the_anomalies_in_training():
    s = _contaminated()
    t = T.mad_threshold(s, 3.0)
    assert 1.2 < t < 2.0  # above the normal bulk (sd 0.1), below every anomaly
    far = s.copy()
    far[200:] *= 100  # anomalies 100x further away barely move the threshold
    assert T.mad_threshold(far, 3.0) == pytest.approx(t, rel=0.05)
    assert T.mad_threshold(np.ones(10), 3.0) == 1.0  # MAD 0 and mean deviation 0: the constant itself


def test_otsu_splits_two_groups():
    s = _contaminated()
    t = T.otsu_threshold(s)
    assert s[:200].max() < t < s[200:].min()


def test_logit_scale_returns_raw_units():
    rng = np.random.default_rng(1)
    logits = np.concatenate([rng.normal(2.0, 1.0, 200), rng.normal(10.0, 1.0, 20)])
    s = 1 / (1 + np.exp(-logits))
    rule = T.ThresholdRule("otsu", scale="logit")
    t = rule.threshold(s)
    assert 0 < t < 1
    assert (s >= t).sum() == 20  # the two groups are split on the logit scale
    assert T.ThresholdRule("otsu").threshold(s) != t


def test_rule_parameters_are_checked():
    with pytest.raises(ConfigError, match="expected contamination"):
        T.ThresholdRule("quantile", expected_contamination=1.5)
    with pytest.raises(ConfigError, match="must be one of"):
        T.ThresholdRule("best-f1")
    with pytest.raises(DataError, match="NaN"):
        T.mad_threshold([1.0, float("nan")])


def test_normalise_puts_the_threshold_at_one_half():
    scores = np.array([0.0, 1.0, 2.0, 3.0, 10.0])
    n = T.normalise(scores, 2.0, 0.0, 4.0)
    assert n[2] == 0.5 and np.all(np.diff(n) >= 0) and n.min() >= 0 and n.max() == 1.0
    assert np.array_equal(n >= 0.5, scores >= 2.0)
    p = np.array([0.3, 0.9, 0.99, 0.999])
    assert np.array_equal(T.normalise(p, 0.99, 0.1, 0.9999, "logit") >= 0.5, p >= 0.99)


def test_at_threshold_counts():
    r = T.at_threshold([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.2], 0.5)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 1)
    assert r["precision"] == r["recall"] == r["f1"] == 0.5
    assert T.at_threshold([0, 1], [0.1, 0.2], 5.0)["f1"] == 0.0


# ----------------------------------------------------------- held-out training scores


@pytest.mark.parametrize("cls", [KNNScorer, SoftPatchScorer])
def test_held_out_scores_exclude_the_images_own_patches(cls):
    """Held-out score of training image i == its score against a bank fitted without it; self-matches give ~0."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(6, 5, 8)).astype(np.float32))
    kwargs = dict(coreset_ratio=1.0, backend="torch")
    if cls is SoftPatchScorer:
        kwargs.update(noise_ratio=0.0, lof_k=2)
    model = cls(**kwargs).fit(x)
    plain, _ = model.score(x)
    assert np.allclose(plain, 0.0, atol=1e-2)  # a training image finds itself in the bank
    held, held_images = model.score_held_out(x)
    assert held.min() > 0.5
    if cls is KNNScorer:
        for i in range(6):
            others = cls(**kwargs).fit(torch.cat([x[:i], x[i + 1:]]))
            ref, _ = others.score(x[i:i + 1])
            np.testing.assert_allclose(held[i], ref[0], rtol=1e-4, atol=1e-4)
    assert held_images.shape == (6,)


@pytest.mark.parametrize("cls", [KNNScorer, SoftPatchScorer])
def test_a_coreset_from_one_image_takes_a_row_of_another(cls):
    """One feature per image and a coreset of one row: the bank gets a second image's row, so that every
    training image can be scored held out (it raised "needs patches of at least two training images")."""
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(12, 1, 8)).astype(np.float32))
    kwargs = dict(noise_ratio=0.0, lof_k=2) if cls is SoftPatchScorer else {}
    model = cls(coreset_ratio=0.05, backend="torch", **kwargs).fit(x)
    owners = model.bank_owner_.tolist()
    assert len(owners) == 2 and owners[0] != owners[1]
    held, _ = model.score_held_out(x)
    assert np.isfinite(held).all()
    if cls is KNNScorer:  # each owner is scored against the other's row, the rest against the nearer of the two
        a, b = owners
        np.testing.assert_allclose(held[a, 0], float((x[a, 0] - x[b, 0]).norm()), rtol=1e-4)
        np.testing.assert_allclose(held[b, 0], float((x[b, 0] - x[a, 0]).norm()), rtol=1e-4)
        # the added row is the k-center pick: the other image's feature farthest from the first row
        far = (x[:, 0] - x[a, 0]).norm(dim=1)
        far[a] = -1
        assert b == int(far.argmax())


def test_a_coreset_over_two_images_is_left_alone():
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(12, 1, 8)).astype(np.float32))
    model = KNNScorer(coreset_ratio=0.25, backend="torch").fit(x)
    assert model.bank_.shape[0] == 3


def test_held_out_needs_a_fresh_fit():
    x = torch.randn(3, 4, 8)
    model = KNNScorer(coreset_ratio=1.0, backend="torch").fit(x)
    loaded = KNNScorer(coreset_ratio=1.0, backend="torch").load_state_dict(model.state_dict())
    with pytest.raises(Exception, match="right after fit"):
        loaded.score_held_out(x)


# ----------------------------------------------------------- the fit's record


@pytest.mark.parametrize("method", ["knn", "funad"])
def test_fit_records_thresholds_chosen_without_labels(tmp_path, method):
    """The record depends on the training features only: flipping every label of the store changes nothing."""
    args = ["--method", method, "--device", "cpu"] + (["--set", "batch_size=4", "--epochs", "2"]
                                                      if method == "funad" else [])
    records = []
    for labelled in (True, False):
        store = make_store(tmp_path / f"s{labelled}.zarr", labelled=labelled)
        out = tmp_path / f"m{labelled}"
        res = CliRunner().invoke(fit_cmd, [str(store), "-o", str(out), *args])
        assert res.exit_code == 0, res.output
        records.append(json.loads((out / "config.json").read_text())["threshold"])
    a, b = records
    assert a["image"] == b["image"] and a["pixel"] == b["pixel"] and a["labels_used"] is False
    assert a["rule"] == ("mad" if method == "funad" else "quantile")  # --threshold-rule auto, the default
    assert set(a["candidates"]["image"]) == set(T.RULES)
    lo, hi = a["training_scores"]["image"]["min"], a["training_scores"]["image"]["max"]
    assert a["training_scores"]["image"]["n"] == a["training_images"] == 8
    assert lo <= a["training_scores"]["image"]["median"] <= hi
    if method == "knn":
        assert lo > 0.05  # leave-one-image-out: no training image scored against its own patches


def test_auto_rule_is_mad_for_the_clean_image_knn_and_quantile_otherwise():
    from funad.config import preset
    from funad.pipelines import thresholds

    cleaned, fast = preset("cleaned").to_dict(), preset("fast").to_dict()
    assert thresholds.DEFAULT_RULE == "auto"
    assert thresholds.rule_for("funad", config=cleaned).name == "mad"
    assert thresholds.rule_for("funad", config=fast).name == "quantile"
    assert thresholds.rule_for("funad", config=fast).scale == "logit"
    assert thresholds.rule_for("knn").name == thresholds.rule_for("softpatch").name == "quantile"
    assert thresholds.rule_for("funad", "otsu", config=cleaned).name == "otsu"  # a named rule is kept


def test_a_guess_of_the_contamination_makes_auto_the_quantile_rule(tmp_path):
    store = make_store(tmp_path / "s.zarr", labelled=True)
    args = ["--device", "cpu", "--set", "batch_size=4", "--epochs", "1"]
    rules_taken = {}
    for name, extra in {"auto": [], "guess": ["--expected-contamination", "0.25"],
                        "named": ["--expected-contamination", "0.25", "--threshold-rule", "otsu"]}.items():
        res = CliRunner().invoke(fit_cmd, [str(store), "-o", str(tmp_path / name), *args, *extra])
        assert res.exit_code == 0, res.output
        record = json.loads((tmp_path / name / "config.json").read_text())["threshold"]
        rules_taken[name] = (record["rule"], record["params"]["expected_contamination"])
    assert rules_taken == {"auto": ("mad", 0.1), "guess": ("quantile", 0.25), "named": ("otsu", 0.25)}


def test_pixel_threshold_is_the_highest_map_value_on_images_called_normal():
    from funad.pipelines import thresholds

    rng = np.random.default_rng(0)
    patches = rng.normal(1.0, 0.05, (40, 4)).astype(np.float32)
    patches[:4, 0] = 5.0  # four training images with one very anomalous patch
    images = patches.max(axis=1)
    record = thresholds.choose(patches, images, (2, 2), (8, 8), thresholds.rule_for("knn", "otsu", pixel_quantile=1.0),
                               "knn")
    maxima = thresholds.map_maxima(patches, (2, 2), (8, 8))
    assert images[:4].min() >= record["image"] > images[4:].max()  # Otsu splits off the four
    assert record["pixel"] == pytest.approx(float(maxima[4:].max()))
    assert set(record["candidates"]["pixel"]) == set(T.RULES)
    # --pixel-quantile: that quantile of the normal-called images' map maxima instead of their maximum
    half = thresholds.choose(patches, images, (2, 2), (8, 8), thresholds.rule_for("knn", "otsu", pixel_quantile=0.5),
                             "knn")
    assert half["image"] == record["image"]
    assert half["pixel"] == pytest.approx(float(np.quantile(maxima[4:], 0.5)))
    assert half["params"]["pixel_quantile"] == 0.5 and "0.5-quantile" in half["pixel_rule"]
    assert T.pixel_threshold(maxima[4:], 1.0) == pytest.approx(record["pixel"])
    default = thresholds.choose(patches, images, (2, 2), (8, 8), thresholds.rule_for("knn", "otsu"), "knn")
    assert default["pixel"] == pytest.approx(float(np.quantile(maxima[4:], T.DEFAULT_PIXEL_QUANTILE)))


@pytest.mark.parametrize("q", [0.0, 1.5, float("nan")])
def test_pixel_quantile_outside_0_1_is_refused(q):
    with pytest.raises(ConfigError, match="pixel quantile"):
        T.ThresholdRule(pixel_quantile=q)


def test_fit_takes_the_pixel_quantile(tmp_path):
    store = make_store(tmp_path / "s.zarr", labelled=True)
    res = CliRunner().invoke(fit_cmd, [str(store), "-o", str(tmp_path / "m"), "--method", "knn", "--device", "cpu",
                                       "--pixel-quantile", "0.5"])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "m" / "config.json").read_text())["threshold"]
    assert record["params"]["pixel_quantile"] == 0.5
    res = CliRunner().invoke(fit_cmd, [str(store), "-o", str(tmp_path / "m"), "--method", "knn", "--device", "cpu",
                                       "--pixel-quantile", "0"])
    assert res.exit_code != 0 and "--pixel-quantile" in res.output



class _Counting:
    """A Progress that records each task's total and how far it advanced."""

    def __init__(self):
        self.tasks = {}

    def task(self, description, total=None, unit="it"):
        record = self.tasks.setdefault(description, {"total": total, "done": 0})

        class _Task:
            def advance(self, n=1):
                record["done"] += n
        return _Task()


@pytest.mark.parametrize("scorer", ["knn", "localnet", "clean_knn"])
def test_training_scores_show_progress_over_every_image(scorer):
    """Scoring the training images advances one progress task to n, whichever path the model scores them by."""
    from funad import FunAD, preset
    from funad.data import TensorSource
    from funad.pipelines.thresholds import training_scores

    x = torch.randn(8, 4, 8)
    if scorer == "knn":
        model = KNNScorer(coreset_ratio=1.0, backend="torch").fit(x)
    else:
        model = FunAD(preset("paper", epochs=1, batch_size=4, scorer=scorer, clean_coreset=1.0)).fit(x)
    progress = _Counting()
    patches, images = training_scores(model, TensorSource(x), progress)
    assert patches.shape == (8, 4) and images.shape == (8,)
    assert progress.tasks["scoring training images"] == {"total": 8, "done": 8}


@pytest.mark.parametrize("scorer", ["knn", "localnet", "clean_knn"])
def test_large_training_sets_are_represented_by_a_sample(scorer):
    """Above the limit, a seeded sample of training images is scored, each exactly as when all are scored."""
    from funad import FunAD, preset
    from funad.data import TensorSource
    from funad.pipelines.thresholds import scored_images, training_scores

    assert np.array_equal(scored_images(5, 5), np.arange(5)) and np.array_equal(scored_images(5, None), np.arange(5))
    ids = scored_images(12, 5)
    assert len(ids) == 5 and np.array_equal(ids, np.unique(ids)) and np.array_equal(ids, scored_images(12, 5))
    x = torch.randn(12, 4, 8)
    if scorer == "knn":
        model = KNNScorer(coreset_ratio=1.0, backend="torch").fit(x)
    else:
        model = FunAD(preset("paper", epochs=1, batch_size=4, scorer=scorer, clean_coreset=1.0)).fit(x)
    every, every_images = training_scores(model, TensorSource(x), limit=None)
    progress = _Counting()
    some, some_images = training_scores(model, TensorSource(x), progress, limit=5)
    np.testing.assert_allclose(some, every[ids], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(some_images, every_images[ids], rtol=1e-5, atol=1e-6)
    assert progress.tasks["scoring training images"] == {"total": 5, "done": 5}


def test_fit_says_when_its_thresholds_come_from_a_sample(tmp_path, monkeypatch):
    from funad.pipelines import thresholds

    monkeypatch.setattr(thresholds, "THRESHOLD_IMAGES", 5)
    store = make_store(tmp_path / "s.zarr")
    out = tmp_path / "m"
    res = CliRunner().invoke(fit_cmd, [str(store), "-o", str(out), "--method", "knn", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "config.json").read_text())["threshold"]
    assert record["training_images"] == 8 and len(record["training_scores"]["image_scores"]) == 5
    assert "on 5 of 8 (a random sample) training images" in " ".join(res.output.split())
