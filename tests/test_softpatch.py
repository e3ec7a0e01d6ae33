"""SoftPatch: per-position outlier scores, denoising, soft weights, persistence, errors, and the CLI path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from funad.errors import ConfigError, DataError, NotFittedError
from funad.knn import KNNScorer
from funad.softpatch import SoftPatchScorer, gaussian_scores, lof_scores


def _contaminated(seed: int = 0, n: int = 30, p: int = 16, d: int = 32, n_noisy: int = 3, spot: int = 5):
    """Normal training images plus ``n_noisy`` whose patch ``spot`` carries the same defect (+5)."""
    g = torch.Generator().manual_seed(seed)
    train = 0.3 * torch.randn(n, p, d, generator=g)
    train[:n_noisy, spot] += 5.0
    test = 0.3 * torch.randn(6, p, d, generator=g)
    test[3:, spot] += 5.0  # the same defect: the overlap setting
    return train, test, np.array([0, 0, 0, 1, 1, 1])


def test_lof_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.neighbors")
    x = torch.randn(3, 40, 5, generator=torch.Generator().manual_seed(1))
    got = lof_scores(x, 6)
    for s in range(3):
        ref = -sklearn.LocalOutlierFactor(n_neighbors=6).fit(x[s].numpy()).negative_outlier_factor_
        np.testing.assert_allclose(got[s].numpy(), ref, rtol=1e-4)


def test_gaussian_scores_are_one_plus_mahalanobis():
    x = torch.randn(2, 50, 3, generator=torch.Generator().manual_seed(2))
    got = gaussian_scores(x, eps=0.01)
    for s in range(2):
        xs = x[s].double().numpy()
        cov = np.cov(xs, rowvar=False) + 0.01 * np.eye(3)
        delta = xs - xs.mean(axis=0)
        ref = 1 + np.sqrt(np.einsum("nd,de,ne->n", delta, np.linalg.inv(cov), delta))
        np.testing.assert_allclose(got[s].numpy(), ref, rtol=1e-5)


@pytest.mark.parametrize("weighting", ["lof", "gaussian"])
def test_planted_noisy_patches_are_dropped(weighting):
    train, _, _ = _contaminated(n=80, d=4)  # few dimensions: a Gaussian fit with 3 outliers in 80 needs them
    sp = SoftPatchScorer(noise_ratio=0.01, weighting=weighting, coreset_ratio=1.0).fit(train)
    assert sp.dropped_.shape == (80, 16) and int(sp.dropped_.sum()) == round(0.01 * 80 * 16)
    assert bool(sp.dropped_[:3, 5].all())  # the three defect patches are the noisiest
    assert sp.bank_.shape[0] == 80 * 16 - int(sp.dropped_.sum())
    assert float(torch.cdist(sp.bank_, train[:3, 5]).min()) > 3.0  # none of them is in the bank


def test_weights_rescale_the_nearest_neighbour_distance():
    train, test, _ = _contaminated()
    sp = SoftPatchScorer(noise_ratio=0.0, coreset_ratio=1.0).fit(train)
    d = torch.cdist(test.reshape(-1, 32), sp.bank_)
    dist, nearest = d.min(dim=1)
    expected = (dist * sp.weights_[nearest]).reshape(6, 16).numpy()
    patches, images = sp.score(test)
    np.testing.assert_allclose(patches, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(images, patches.max(axis=1))
    sp.weights_ = sp.weights_ * 2.0
    np.testing.assert_allclose(sp.score_patches(test), 2.0 * patches, rtol=1e-6)
    # Without a drop the defect patches stay in the bank, but with large LOF weights.
    assert float(sp.outlier_scores_[:3, 5].min()) > 2.0 * float(sp.outlier_scores_[3:].median())


def test_softpatch_beats_knn_when_test_anomalies_were_in_training():
    train, test, labels = _contaminated()
    knn = KNNScorer(coreset_ratio=1.0).fit(train).score_images(test)
    soft = SoftPatchScorer(coreset_ratio=1.0).fit(train).score_images(test)
    def margin(scores):  # lowest anomalous score over highest normal one
        return scores[labels == 1].min() / scores[labels == 0].max()

    assert margin(knn) < 1.15  # kNN's bank holds the defect, so its test look-alikes barely stand out
    assert margin(soft) > 1.5


def test_state_dict_round_trip_gives_identical_scores():
    train, test, _ = _contaminated()
    sp = SoftPatchScorer(coreset_ratio=0.3, seed=2).fit(train)
    state = sp.state_dict()
    assert set(state) == {"bank", "weights"} and state["weights"].shape == (state["bank"].shape[0],)
    loaded = SoftPatchScorer().load_state_dict({k: v.clone() for k, v in state.items()})
    np.testing.assert_array_equal(loaded.score_patches(test), sp.score_patches(test))


def test_few_images_clip_lof_k():
    train, test, _ = _contaminated(n=4)
    sp = SoftPatchScorer(lof_k=6, coreset_ratio=1.0).fit(train)  # k becomes 3
    assert np.isfinite(sp.score_patches(test)).all()


def test_errors_are_specific():
    train, test, _ = _contaminated()
    with pytest.raises(ConfigError, match="drop every patch"):
        SoftPatchScorer(noise_ratio=1.0).fit(train)
    with pytest.raises(DataError, match="would drop all 480 training patches"):
        SoftPatchScorer(noise_ratio=0.9995).fit(train)
    with pytest.raises(ConfigError, match="weighting"):
        SoftPatchScorer(weighting="knn").fit(train)
    with pytest.raises(ConfigError, match="coreset_ratio"):
        SoftPatchScorer(coreset_ratio=0.0).fit(train)
    with pytest.raises(DataError, match="keeps no patch"):
        SoftPatchScorer(noise_ratio=0.5, coreset_ratio=0.001).fit(train)
    with pytest.raises(NotFittedError):
        SoftPatchScorer().score_patches(test)
    with pytest.raises(DataError, match="'bank' and 'weights'"):
        SoftPatchScorer().load_state_dict({"bank": train[0]})
    with pytest.raises(DataError, match=r"shape \(16,\)"):
        SoftPatchScorer().load_state_dict({"bank": train[0], "weights": torch.ones(3)})


def test_cli_fit_eval_on_the_tiny_store(tiny_store, tmp_path):
    from funad.cli.main import cli

    store = tiny_store(n_train=8, n_test=6)
    runner = CliRunner()
    for method, extra in (("softpatch", ["--set", "noise_ratio=0.1", "--set", "weighting=gaussian"]),
                          ("knn", ["--coreset-ratio", "0.5"])):
        model = tmp_path / method
        res = runner.invoke(cli, ["fit", str(store), "-o", str(model), "--method", method, *extra])
        assert res.exit_code == 0, res.output
        config = json.loads((model / "config.json").read_text())
        assert config["method"] == method and config["config"]["coreset_ratio"] in (0.1, 0.5)
        res = runner.invoke(cli, ["eval", str(model), "-o", str(tmp_path / f"{method}_eval")])
        assert res.exit_code == 0, res.output
        metrics = json.loads((tmp_path / f"{method}_eval" / "metrics.json").read_text())
        assert metrics["method"] == method and 0.0 <= metrics["image_auroc"] <= 1.0
    assert json.loads((tmp_path / "softpatch" / "config.json").read_text())["config"]["noise_ratio"] == 0.1
    for args, message in ((["--method", "softpatch", "--set", "noise_ratio=1"], "drop every patch"),
                          (["--method", "softpatch", "--set", "lambda_=1"], "no setting 'lambda_'"),
                          (["--method", "knn", "--coreset-ratio", "0.001"], "keeps no patch")):
        res = runner.invoke(cli, ["fit", str(store), "-o", str(tmp_path / "bad"), "--overwrite", *args])
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output
