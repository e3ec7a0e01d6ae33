"""FUN-AD* synthetic anomalies: the generator, extraction (--synthetic), training with them, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import backbone_killed_on_call
from funad import cache
from funad.config import FunADConfig
from funad.localnet import LocalNet
from funad.synthetic import SyntheticParams, make_synthetic, perlin_mask
from funad import losses
from funad.train_step import Targets, _ms_input, optimise, use_synthetic
from funad.cli.extract_cmd import extract as extract_cli
from funad.pipelines.errors import PipelineError
from funad.pipelines.extract import extract
from funad.pipelines.fit import FitSpec, fit
from funad.pipelines.synthetic import check_ratio, preview_path

from test_extract import bb, make_mvtec  # noqa: F401  (the tiny ViT fixture)


def _images(size=48):
    rng = np.random.default_rng(1)
    base = np.full((size, size, 3), 60, np.uint8)
    texture = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return base, texture


def test_generator_is_seeded_and_changes_only_the_masked_region():
    base, texture = _images()
    a_img, a_mask = make_synthetic(base, texture, np.random.default_rng(7))
    b_img, b_mask = make_synthetic(base, texture, np.random.default_rng(7))
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    params = SyntheticParams()
    assert params.min_area <= a_mask.mean() <= params.max_area
    outside = a_mask == 0
    np.testing.assert_array_equal(a_img[outside], base[outside])  # untouched outside the mask
    inside = np.abs(a_img[~outside].astype(int) - base[~outside].astype(int)).mean()
    assert inside > 5  # the texture shows inside it
    c_img, c_mask = make_synthetic(base, texture, np.random.default_rng(8))
    assert not np.array_equal(a_mask, c_mask)


def test_perlin_masks_respect_the_area_range_over_many_seeds():
    params = SyntheticParams(min_area=0.05, max_area=0.2)
    areas = [perlin_mask(40, np.random.default_rng(s), params).mean() for s in range(20)]
    assert min(areas) >= 0.05 and max(areas) <= 0.2
    assert len({round(a, 4) for a in areas}) > 10  # random thresholds and noise, not one mask


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_ratio_outside_0_1_is_refused(ratio):
    with pytest.raises(PipelineError, match=r"--synthetic .* in \(0, 1\]"):
        check_ratio(ratio)


def test_cli_refuses_a_bad_ratio_in_one_line(tmp_path):
    data = make_mvtec(tmp_path / "data", n_train=3)
    res = CliRunner().invoke(extract_cli, [str(data), "-o", str(tmp_path / "s.zarr"), "--synthetic", "1.5"])
    assert res.exit_code != 0
    assert "--synthetic" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "s.zarr").exists()


def test_extract_stores_synthetic_images_with_masks_sources_and_preview(tmp_path, bb):
    data = make_mvtec(tmp_path / "data", n_train=10)
    out = tmp_path / "s.zarr"
    result = extract(data, out, backbone=bb, synthetic=0.2, seed=3, num_workers=0)
    assert result.written == 15  # 10 train + 3 test + round(0.2 * 10) synthetic
    with cache.open(out) as store:
        ids = store.indices("synthetic")
        assert ids.tolist() == [13, 14]
        assert set(store.indices("test").tolist()).isdisjoint(ids)
        plan = store.attrs["synthetic"]
        assert plan["seed"] == 3 and plan["n"] == 2
        train = set(store.indices("train").tolist())
        for b, t in zip(plan["base_ids"], plan["texture_ids"]):
            assert b != t and b in train and t in train
        masks = store.read_masks(ids)
        assert all(0 < m.mean() < 0.5 for m in masks)
    picture = Image.open(preview_path(out))
    assert picture.size[0] > 0 and picture.size[1] == 2 * picture.size[0] // 2  # image row + mask row

    again = extract(data, out, backbone=bb, synthetic=0.2, seed=3, num_workers=0)
    assert (again.written, again.already) == (0, 15)
    with pytest.raises(cache.CacheMismatchError, match="synthetic"):
        extract(data, out, backbone=bb, synthetic=0.2, seed=4, num_workers=0)


def test_an_interrupted_run_resumes_to_the_same_synthetic_features(tmp_path, bb, monkeypatch):

    data = make_mvtec(tmp_path / "data", n_train=6)
    extract(data, tmp_path / "clean.zarr", backbone=bb, synthetic=0.5, seed=1, batch_size=4, num_workers=0)
    with backbone_killed_on_call(2), pytest.raises(KeyboardInterrupt):
        extract(data, tmp_path / "crash.zarr", backbone=bb, synthetic=0.5, seed=1, batch_size=4, num_workers=0)
    result = extract(data, tmp_path / "crash.zarr", backbone=bb, synthetic=0.5, seed=1, batch_size=4, num_workers=0)
    assert (result.already, result.written) == (4, 8)  # 6 train + 3 test + 3 synthetic
    with cache.open(tmp_path / "crash.zarr") as resumed, cache.open(tmp_path / "clean.zarr") as clean:
        ids = clean.indices("synthetic")
        np.testing.assert_array_equal(resumed.read_features(ids), clean.read_features(ids))
        np.testing.assert_array_equal(resumed.read_masks(ids), clean.read_masks(ids))


def test_synthetic_needs_training_images(tmp_path, bb):
    data = make_mvtec(tmp_path / "data", n_train=1)
    with pytest.raises(PipelineError, match="at least two training images"):
        extract(data, tmp_path / "s.zarr", backbone=bb, synthetic=0.5, num_workers=0)


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory, bb):
    root = tmp_path_factory.mktemp("syn")
    data = make_mvtec(root / "data", n_train=8)
    extract(data, root / "s.zarr", backbone=bb, synthetic=0.25, seed=0, num_workers=0)
    extract(data, root / "plain.zarr", backbone=bb, num_workers=0)
    return root


def test_fit_trains_on_synthetic_images_by_default_and_never_tests_them(synthetic_store):
    store_path = synthetic_store / "s.zarr"
    small = (("batch_size", 4),)
    on = fit(store_path, synthetic_store / "on", FitSpec(epochs=1, overrides=small, contamination=0.5), device="cpu")
    split = on.config["contamination"]
    assert split["synthetic_ids"] == [11, 12]
    assert set(split["synthetic_ids"]).isdisjoint(split["test_ids"] + split["train_ids"])
    assert on.config["threshold"]["training_scores"]["image"]["n"] == split["n_train"]  # real images only
    off = fit(store_path, synthetic_store / "off", FitSpec(epochs=1, overrides=small, synthetic=False), device="cpu")
    assert off.config["contamination"]["synthetic_ids"] == [] and off.config["config"]["synthetic"] == "off"
    with pytest.raises(PipelineError, match="holds no synthetic images"):
        fit(synthetic_store / "plain.zarr", synthetic_store / "x", FitSpec(epochs=1, overrides=small, synthetic=True),
            device="cpu")
    with pytest.raises(PipelineError, match="--synthetic applies to --method funad only"):
        FitSpec(method="knn", synthetic=True)


def test_mutual_smoothness_does_not_backpropagate_through_synthetic_patches():
    pred = torch.tensor([0.2, 0.9, 0.7, 0.1], requires_grad=True)
    pairs = torch.tensor([[0, 2], [1, 3]])  # each real patch paired with a synthetic one
    targets = Targets(d=torch.zeros(4), d_hat=torch.zeros(4), y=torch.zeros(4), amb=torch.zeros(4, dtype=torch.bool),
                      pairs=pairs)
    use_synthetic(targets, torch.tensor([False, False, True, True]), "pseudo")
    losses.mutual_smoothness(_ms_input(pred, targets), pairs).backward()
    assert torch.all(pred.grad[2:] == 0) and torch.all(pred.grad[:2] != 0)

    # through a whole step: with every patch synthetic, L_ms moves no weight (same step as without pairs)
    f = torch.randn(2, 2, 6, generator=torch.Generator().manual_seed(0))
    cfg = FunADConfig(lambda_=10.0)
    steps = []
    for with_pairs in (True, False):
        net = LocalNet(6, generator=torch.Generator().manual_seed(1))
        t = Targets(d=torch.zeros(4), d_hat=torch.zeros(4), y=torch.tensor([0.0, 1.0, 0.0, 1.0]),
                    amb=torch.zeros(4, dtype=torch.bool), pairs=pairs if with_pairs else pairs[:0])
        use_synthetic(t, torch.ones(4, dtype=torch.bool), "pseudo")
        optimise(net, torch.optim.SGD(net.parameters(), lr=0.1), f, t, cfg, torch.zeros_like(f))
        steps.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    torch.testing.assert_close(steps[0], steps[1])


def test_mask_mode_takes_labels_from_the_masks_for_synthetic_patches_only():
    targets = Targets(d=torch.zeros(4), d_hat=torch.zeros(4), y=torch.tensor([1.0, 0.0, 0.0, 1.0]),
                      amb=torch.ones(4, dtype=torch.bool), pairs=torch.zeros((0, 2), dtype=torch.long))
    synthetic = torch.tensor([False, False, True, True])
    use_synthetic(targets, synthetic, "mask", torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert targets.y.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert targets.amb.tolist() == [True, True, False, False]
