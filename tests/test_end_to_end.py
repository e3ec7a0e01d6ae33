"""extract -> fit -> eval through the CLI on a small real MVTec AD subset.

Slow (about a minute on 2 CPU cores): run with `make test-slow`.
"""

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from funad.cli.main import cli

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


def _subset(src: Path, dst: Path) -> None:
    """A small MVTec layout of symlinks: 24 train, 4 good and 6 broken_large test images."""
    picks = {"train/good": 24, "test/good": 4, "test/broken_large": 6}
    for rel, n in picks.items():
        (dst / rel).mkdir(parents=True)
        for f in sorted((src / rel).glob("*.png"))[:n]:
            os.symlink(f, dst / rel / f.name)
            if rel == "test/broken_large":
                gt = dst / "ground_truth/broken_large"
                gt.mkdir(parents=True, exist_ok=True)
                os.symlink(src / "ground_truth/broken_large" / f"{f.stem}_mask.png", gt / f"{f.stem}_mask.png")


def _run(args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_extract_fit_eval_on_real_bottle_images(shared_dir, tmp_path):
    data = tmp_path / "bottle"
    _subset(shared_dir / "data/mvtec_ad/bottle", data)
    weights = shared_dir / "weights/vit_small_patch14_dinov2.imgfocus.safetensors"
    store = tmp_path / "feats.zarr"
    _run(["extract", data, "-o", store, "--dataset", "mvtec", "--backbone", "vit_small_patch14_dinov2",
          "--weights", weights, "--layer", 7, "--image-size", 392])

    reports = {}
    for method, extra in (("knn", []), ("funad", ["--epochs", 5, "--set", "batch_size=8"])):
        model = tmp_path / f"model_{method}"
        _run(["fit", store, "-o", model, "--method", method, "--contamination", 0.1, "--no-overlap", *extra])
        report = tmp_path / f"report_{method}"
        _run(["eval", model, "-o", report])
        reports[method] = json.loads((report / "metrics.json").read_text())
        assert (report / "overview.png").stat().st_size > 10_000
        assert len((report / "scores.csv").read_text().splitlines()) == 1 + reports[method]["counts"]["n_test"]

    for metrics in reports.values():
        assert metrics["selection"] == "final"
        # 10% of 24 normal images moves 2 of the 6 anomalies into training (no overlap).
        assert metrics["counts"] == {**metrics["counts"], "n_test": 8, "n_anomalous": 4, "n_moved": 2}
    # Broken bottles are an easy defect: a nearest-neighbour bank of clean patches
    # must rank every broken test bottle above every good one, and localise it.
    assert reports["knn"]["image_auroc"] == 1.0
    assert reports["knn"]["pixel_auroc"] > 0.9
