"""``scorer="clean_knn"``: the final Local-Net keeps the training images it scores lowest; a kNN on them scores."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from funad import FunAD, preset
from funad.config import FunADConfig, effective_settings
from funad.errors import ConfigError, DataError, NotFittedError
from funad import cache
from funad.pipelines import modeldir, thresholds
from funad.pipelines.settings import model_config
from funad.pipelines.sweep_grid import config_digest

from test_fit_pipeline import FAST, assert_same_weights, make_store, run, split_image_auroc, two_curves

N, P, D = 20, 6, 8
ANOMALOUS = [1, 7, 12]  # images with two far-off patches each


def features(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, P, D, generator=g) * 0.3
    for i in ANOMALOUS:
        x[i, :2] += 3.0
    return x


def cfg(**overrides):
    return preset("paper", **{**dict(epochs=4, batch_size=5, lr=1e-3, seed=0, scorer="clean_knn", clean_share=0.5,
                                     clean_coreset=1.0), **overrides})


@pytest.fixture(scope="module")
def fitted():
    torch.set_num_threads(1)
    return FunAD(cfg()).fit(features())


def test_keeps_the_share_the_final_net_scores_lowest(fitted):
    x = features()
    net_scores = fitted._net_scores(x).max(axis=1)  # φ's image scores, computed apart from the selection
    expected = np.sort(np.argsort(net_scores, kind="stable")[:N // 2])
    np.testing.assert_array_equal(fitted.clean_images_, expected)
    assert not set(ANOMALOUS) & set(fitted.clean_images_.tolist())  # the far-off images score highest


def test_never_keeps_a_synthetic_image_and_keeps_at_least_two(fitted):
    x = features()
    lowest = np.argsort(fitted._net_scores(x).max(axis=1), kind="stable")
    synthetic = np.zeros(N, dtype=bool)
    synthetic[lowest[:3]] = True  # flag the three images φ likes best
    model = FunAD(cfg())
    model.__dict__.update(fitted.__dict__)
    model.fit_clean_bank(x, synthetic=synthetic)
    assert not set(lowest[:3]) & set(model.clean_images_.tolist())
    assert len(model.clean_images_) == (N - 3) // 2
    tiny = FunAD(cfg(clean_share=0.01))
    tiny.__dict__.update(fitted.__dict__)
    tiny.config = cfg(clean_share=0.01)
    assert len(tiny.fit_clean_bank(x).clean_images_) == 2


def test_scores_are_distances_to_the_kept_images_patches(fitted):
    x = features(seed=1)
    kept = features()[fitted.clean_images_].reshape(-1, D)  # clean_coreset=1 keeps every patch
    patches, images = fitted.score(x)
    brute = torch.cdist(x.reshape(-1, D).double(), kept.double()).min(dim=1).values.reshape(N, P)
    np.testing.assert_allclose(patches, brute.numpy(), rtol=1e-4, atol=1e-4)
    assert images.shape == (N,) and np.all(images <= patches.max(axis=1) + 1e-5)  # PatchCore's weight is <= 1
    np.testing.assert_array_equal(fitted.score_patches(x), patches)
    np.testing.assert_array_equal(fitted.score_images(x), images)


def test_held_out_scores_never_compare_an_image_with_itself(fitted):
    x = features()
    patches, _ = fitted.score_held_out(x)
    kept = fitted.clean_images_
    for i in range(N):
        others = [j for j in kept if j != i]
        brute = torch.cdist(x[i].double(), x[others].reshape(-1, D).double()).min(dim=1).values
        np.testing.assert_allclose(patches[i], brute.numpy(), rtol=1e-4, atol=1e-4)
    assert patches[kept].min() > 0.1  # a plain score would find each kept image's own patches at 0


def test_state_round_trip_and_weights_without_a_bank(fitted):
    x = features(seed=2)
    state = fitted.state_dict()
    assert state["knn"]["bank"].shape == (len(fitted.clean_images_) * P, D)
    loaded = FunAD.from_state_dict(state)
    np.testing.assert_array_equal(loaded.score(x)[0], fitted.score(x)[0])
    np.testing.assert_array_equal(loaded.clean_images_, fitted.clean_images_)
    bare = {k: v for k, v in state.items() if k not in ("knn", "clean_images")}
    with pytest.raises(NotFittedError, match="fit_clean_bank"):
        FunAD.from_state_dict(bare).score(x)
    local = FunAD(cfg(scorer="localnet")).load_state_dict(bare)
    np.testing.assert_array_equal(local.score(x)[0], fitted._net_scores(x))  # the same φ, scored by itself


def test_training_is_the_same_whatever_the_scorer(fitted):
    local = FunAD(cfg(scorer="localnet")).fit(features())
    for key, value in local.state_dict()["net"].items():
        assert torch.equal(value, fitted.state_dict()["net"][key]), key


def test_adopting_a_trained_net_gives_what_training_again_gives(fitted):
    x, y = features(), features(seed=3)
    other = cfg(clean_share=0.25, clean_coreset=0.5)
    fresh = FunAD(other).fit(x)
    adopted = FunAD(other).adopt_training(fitted.state_dict(), x)
    np.testing.assert_array_equal(adopted.clean_images_, fresh.clean_images_)
    assert len(adopted.clean_images_) == N // 4
    for got, want in zip(adopted.score(y), fresh.score(y)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(adopted.score_held_out(x)[1], fresh.score_held_out(x)[1])
    # the Local-Net's own scores too, from a model that trained with the kNN scorer
    local = FunAD(cfg(scorer="localnet")).adopt_training(fitted.state_dict(with_bank=False), x)
    np.testing.assert_array_equal(local.score(y)[0], FunAD(cfg(scorer="localnet")).fit(x).score(y)[0])
    assert local.knn_ is None


def test_adopting_refuses_a_net_trained_with_other_training_settings(fitted):
    with pytest.raises(ConfigError, match=r"lr=0.001 \(here 0.002\)"):
        FunAD(cfg(lr=2e-3)).adopt_training(fitted.state_dict(), features())
    with pytest.raises(DataError, match="trained on 6 patches per image, the features have 3"):
        FunAD(cfg()).adopt_training(fitted.state_dict(), features()[:, :3])


@pytest.mark.parametrize("bad, match", [
    (dict(scorer="knn"), "scorer must be one of"),
    (dict(clean_share=0.0), "clean_share"),
    (dict(clean_coreset=1.5), "clean_coreset"),
    (dict(score_space="logit"), "score_space"),
])
def test_bad_settings_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        cfg(**bad)


def test_old_sweep_cells_keep_their_key_and_the_new_scorer_gets_its_own():
    today = model_config("funad", "fast", seed=1)
    before = {k: v for k, v in today.items() if k not in ("scorer", "clean_share", "clean_coreset")}
    assert config_digest(today) == config_digest(before)  # cells fitted before the setting existed resume
    assert config_digest(model_config("funad", "fast", overrides=(("scorer", "clean_knn"),), seed=1)) \
        != config_digest(today)
    assert effective_settings({"cfg_scorer": "localnet", "cfg_clean_share": 0.5, "cfg_lr": 1e-4}, "cfg_") \
        == {"cfg_lr": 1e-4}


def test_threshold_scale_follows_the_scores():
    assert thresholds.rule_for("funad", config=FunADConfig().to_dict()).scale == "logit"
    assert thresholds.rule_for("funad", config=FunADConfig(scorer="clean_knn").to_dict()).scale == "identity"
    assert thresholds.rule_for("funad", config=FunADConfig(score_space="logit").to_dict()).scale == "identity"
    assert thresholds.rule_for("knn").scale == "identity"


def test_fit_eval_and_oracle_with_the_clean_knn_scorer(tmp_path):
    store_path = make_store(tmp_path / "feats.zarr")
    out = tmp_path / "m"
    res = run([store_path, "-o", out, *FAST, "--contamination", "0.25", "--set", "scorer=clean_knn"])
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    record = config["threshold"]
    assert record["params"]["scale"] == "identity" and "leave-one-image-out" in record["how"]
    model, info = modeldir.load_model_dir(out)
    assert model.knn_ is not None and len(model.clean_images_) == len(info.train_ids) // 2
    with cache.open(store_path) as store:
        kept_labels = store.labels[np.asarray(info.train_ids)[model.clean_images_]]
    assert config["clean_bank"] == {"images": len(model.clean_images_), "bank_patches": model.knn_.bank_.shape[0],
                                    "normal_share": float((kept_labels == 0).mean()),
                                    "anomalous_kept": int((kept_labels != 0).sum())}
    assert f"call {int((kept_labels == 0).sum())} of them normal" in res.output
    with cache.open(store_path) as store:
        x = torch.from_numpy(store.read_features(info.test_ids, dtype="float32"))
        labels = store.labels[info.test_ids]
    scores = model.score_images(x)
    assert scores[labels == 1].min() > scores[labels == 0].max()  # planted anomalies outscore
    from funad.cli.eval_cmd import evaluate

    res = CliRunner().invoke(evaluate, [str(out), "-o", str(tmp_path / "report"), "--no-pictures"])
    assert res.exit_code == 0, res.output
    oracle = tmp_path / "oracle"
    res = run([store_path, "-o", oracle, *FAST, "--epochs", "2", "--select", "oracle", "--set", "scorer=clean_knn"])
    assert res.exit_code == 0, res.output
    model, _ = modeldir.load_model_dir(oracle)
    assert model.knn_ is not None  # rebuilt with the chosen epoch's φ


def test_learning_curve_scores_each_point_as_the_model_would(tmp_path):
    """With clean_knn each point builds the bank from that epoch's weights: the last point is the model's own
    eval, and the Local-Net's curve beside it is the curve of the same fit with scorer=localnet."""
    store_path = make_store(tmp_path / "feats.zarr")
    local, knn = tmp_path / "local", tmp_path / "knn"
    local_log, knn_log = two_curves(store_path, (local, knn), ["--set", "scorer=localnet"],
                                    ["--set", "scorer=clean_knn"])
    assert [r["epoch"] for r in knn_log] == [1, 2]
    for a, b in zip(local_log, knn_log):
        assert b["test_pixel_auroc_localnet"] == pytest.approx(a["test_pixel_auroc"])
        assert "test_pixel_auroc_logit" not in b  # distances have no logit
    assert split_image_auroc(knn, store_path) == pytest.approx(knn_log[-1]["test_image_auroc"])
    assert_same_weights(modeldir.load_weights(local)["net"], modeldir.load_weights(knn)["net"])


def test_the_default_preset_trains_as_fast_for_half_the_iterations_and_scores_with_the_clean_image_knn():
    from funad.config import DEFAULT_PRESET

    default, fast = preset(DEFAULT_PRESET).to_dict(), preset("fast").to_dict()
    assert default["scorer"] == "clean_knn" and fast["scorer"] == preset("paper").scorer == "localnet"
    assert {k for k in default if default[k] != fast[k]} == {"scorer", "max_iterations"}
    assert 2 * default["max_iterations"] == fast["max_iterations"] == 420


def test_clean_max_patches_caps_the_bank_and_old_cells_keep_their_key():
    capped = FunAD(cfg(clean_coreset=0.5, clean_max_patches=7)).fit(features())
    assert capped.knn_.bank_.shape[0] == 7  # below the coreset's round(0.5 * 10 * 6) = 30
    assert FunAD(cfg(clean_coreset=0.5, clean_max_patches=1000)).fit(features()).knn_.bank_.shape[0] == 30
    loaded = FunAD.from_state_dict(capped.state_dict())
    np.testing.assert_allclose(loaded.score(features())[0], capped.score(features())[0], rtol=1e-5, atol=1e-6)
    assert FunADConfig.parse_value("clean_max_patches", "16384") == 16384
    assert FunADConfig.parse_value("clean_max_patches", "none") is None
    with pytest.raises(ConfigError, match="clean_max_patches"):
        cfg(clean_max_patches=0)
    knn = model_config("funad", "fast", overrides=(("scorer", "clean_knn"),), seed=1)
    before = {k: v for k, v in knn.items() if k != "clean_max_patches"}
    assert config_digest({**knn, "clean_max_patches": None}) == config_digest(before)  # no cap: as before it existed
    assert config_digest({**knn, "clean_max_patches": 16384}) != config_digest(before)
