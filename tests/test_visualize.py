"""Report pictures: valid PNGs with visible content, readable names, no global matplotlib state."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from funad.errors import DataError
from funad.pipelines.visualize import Shot, overview_grid, panel, sample_name, write_report_pictures


def _scene(n: int = 6, size: int = 48, preview: int = 32, seed: int = 0):
    """Grey images (previews smaller than the maps), square defects, maps peaking on them."""
    rng = np.random.default_rng(seed)
    images = [np.full((preview, preview, 3), 90 + 10 * i, dtype=np.uint8) for i in range(n)]
    masks = np.zeros((n, size, size), dtype=np.uint8)
    labels = np.array([1, 0] * (n // 2))
    for i in np.flatnonzero(labels):
        masks[i, 10:20, 15:30] = 1
    maps = (rng.random((n, size, size)) * 0.2 + masks).astype(np.float32)
    scores = maps.max(axis=(1, 2))
    return images, masks, maps, scores, labels


def test_panel_writes_a_nontrivial_png(tmp_path):
    images, masks, maps, scores, _ = _scene()
    out = panel(images[0], masks[0], maps[0], "bottle  test-broken-000", tmp_path / "sub" / "p.png",
                vmin=0.0, vmax=1.2, score=float(scores[0]))
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.width > 2 * im.height  # three parts side by side
        rgb = np.asarray(im.convert("RGB"))
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 200  # heatmap, colour bar, text
    # The jet heatmap reaches deep red on the defect and the contour draws lime.
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    lime = (rgb[..., 1] > 200) & (rgb[..., 0] < 100) & (rgb[..., 2] < 100)
    assert red.sum() > 50 and lime.sum() > 20


def test_panel_without_mask_and_grayscale_image(tmp_path):
    out = panel(np.zeros((20, 20), np.uint8), None, np.ones((40, 30)), "t", tmp_path / "p.png", 0.0, 1.0)
    assert Image.open(out).size[0] > 0
    with pytest.raises(DataError, match=r"\(H, W\)"):
        panel(np.zeros((20, 20), np.uint8), None, np.ones((2, 40, 30)), "t", tmp_path / "q.png", 0.0, 1.0)


def test_overview_grid(tmp_path):
    images, masks, maps, scores, labels = _scene()
    items = [Shot(f"img-{i}", images[i], masks[i], maps[i], float(scores[i]), int(labels[i])) for i in range(6)]
    out = overview_grid(items, tmp_path / "grid.png", 0.0, 1.2, threshold=0.5, ncols=4)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.height > 300  # two rows
    with pytest.raises(DataError, match="at least one"):
        overview_grid([], tmp_path / "empty.png", 0.0, 1.0)


def test_sample_name():
    assert sample_name("test/broken_large/003.png") == "test-broken_large-003"
    assert sample_name("kos01/Part 3.jpg") == "kos01-Part-3"
    assert sample_name(r"a\b\c.bmp") == "a-b-c"


def test_write_report_pictures_names_and_errors(tmp_path):
    images, masks, maps, scores, labels = _scene()
    scores = np.array([0.9, 0.8, 0.3, 0.2, 0.7, 0.1])  # labels 1 0 1 0 1 0
    names = [f"test-x-{i:03d}" for i in range(6)]
    written = write_report_pictures(images, list(masks), maps, scores, labels, names, tmp_path,
                                    threshold=0.5, k=2, title="unit")
    got = sorted(p.name for p in tmp_path.iterdir())
    assert got == sorted([
        "most-01_0.900_test-x-000.png", "most-02_0.800_test-x-001.png",
        "least-01_0.100_test-x-005.png", "least-02_0.200_test-x-003.png",
        "fp_0.800_test-x-001.png",  # label 0 scored >= 0.5
        "fn_0.300_test-x-002.png",  # label 1 scored < 0.5
        "overview.png",
    ])
    assert [p.name for p in written["fp"]] == ["fp_0.800_test-x-001.png"]
    assert len(written["overview"]) == 1
    # Unknown labels are never errors; no threshold, no fp/fn.
    other = tmp_path / "unlabelled"
    written = write_report_pictures(images, None, maps, scores, np.full(6, -1), names, other, threshold=None, k=1)
    assert sorted(p.name for p in other.iterdir()) == sorted(
        ["most-01_0.900_test-x-000.png", "least-01_0.100_test-x-005.png", "overview.png"])
    with pytest.raises(DataError, match="pair up"):
        write_report_pictures(images[:5], None, maps, scores, labels, names, tmp_path, threshold=None)


def test_drawing_never_loads_pyplot(tmp_path):
    """pyplot holds global state (current figure, backend); the module draws without it."""
    code = ("import sys, numpy as np; from funad.pipelines.visualize import panel; "
            f"panel(np.zeros((8, 8, 3), np.uint8), None, np.ones((8, 8)), 't', r'{tmp_path / 'p.png'}', 0, 1); "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
