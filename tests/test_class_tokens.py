"""``funad fit --tokens class``: the image-level variant on real images (scikit-learn's digits) with a tiny ViT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from funad import cache
from funad.cli.main import cli
from funad.pipelines.errors import PipelineError
from funad.pipelines.extract import extract
from funad.pipelines.fit import FitSpec, fit

from test_extract import bb  # noqa: F401  (the tiny ViT fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from digits_class_tokens import make  # noqa: E402


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory, bb):
    root = tmp_path_factory.mktemp("digits")
    make(root / "data", normal=0, per_digit=2, size=32, seed=0)  # 107 + 71 zeros, 18 anomalies
    extract(root / "data", root / "d.zarr", backbone=bb, num_workers=0, batch_size=64)
    return root


def test_class_token_fit_and_eval_report_image_metrics_only(digits_store):
    store_path = digits_store / "d.zarr"
    spec = FitSpec(tokens="class", contamination=0.1, epochs=2, overrides=(("batch_size", 16),))
    result = fit(store_path, digits_store / "m", spec, device="cpu")
    with cache.open(store_path) as store:
        assert result.model.n_patches_ == 1 and result.model.dim_ == store.token_dim  # f_i = c_i
    assert result.config["tokens"] == "class"
    assert result.config["contamination"]["n_moved"] == 11  # round(0.1 * 107)

    res = CliRunner().invoke(cli, ["eval", str(digits_store / "m"), "-o", str(digits_store / "rep")])
    assert res.exit_code == 0, res.output
    metrics = json.loads((digits_store / "rep" / "metrics.json").read_text())
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    assert metrics["pixel_auroc"] is None and metrics["aupro"] is None
    assert "class tokens" in metrics["pixel_metrics_absent"]
    assert "image metrics only" in res.output


def test_knn_on_class_tokens(digits_store):
    result = fit(digits_store / "d.zarr", digits_store / "knn", FitSpec(method="knn", tokens="class",
                                                                        coreset_ratio=1.0), device="cpu")
    with cache.open(digits_store / "d.zarr") as store:
        assert result.model.dim_ == store.token_dim
    res = CliRunner().invoke(cli, ["eval", str(digits_store / "knn"), "-o", str(digits_store / "knn_rep")])
    assert res.exit_code == 0, res.output
    assert json.loads((digits_store / "knn_rep" / "metrics.json").read_text())["pixel_ap"] is None


def test_class_tokens_refused_by_name_on_a_store_without_them(digits_store, tmp_path, monkeypatch):
    # Every store format funad writes keeps the class tokens (a store missing the array does not even open:
    # it is reported as incomplete); the refusal guards a store that says it has none.
    monkeypatch.setattr(type(cache.open(digits_store / "d.zarr")), "has_class_tokens", property(lambda self: False))
    with pytest.raises(PipelineError, match=r"--tokens class: cache .*d\.zarr stores no class tokens"):
        fit(digits_store / "d.zarr", tmp_path / "m", FitSpec(tokens="class", epochs=1), device="cpu")
    res = CliRunner().invoke(cli, ["fit", str(digits_store / "d.zarr"), "-o", str(tmp_path / "m2"), "--tokens", "class"])
    assert res.exit_code != 0 and "stores no class tokens" in res.output and "Traceback" not in res.output
