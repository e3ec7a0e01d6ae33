"""The image-level variant (``funad fit --tokens class``) on real images no one here drew: scikit-learn's digits.

``make OUT``: writes an MVTec-layout folder from ``sklearn.datasets.load_digits``
(1,797 8x8 scans of handwritten digits, bundled with scikit-learn, no download):
one digit is normal (60% of its images in train/good, 40% in test/good), the other
nine are anomalies (``--per-digit`` of each in test/anomaly, each with an all-ones
mask: the whole image is the anomaly). Images are upsampled to ``--size`` px
(nearest) and written as RGB PNGs; the backbone's own pre-processing does the rest.
Contamination is added by ``funad fit --contamination 0.1``, which moves test
anomalies into the unlabelled training set (FUNAD_SPEC.md, contamination protocol).

``table OUT REPORTS...``: the image AUROC of every eval report given, mean and std per method.

The whole measurement: ``bash benchmarks/digits_class_tokens.sh OUT`` (extract, 3 seeds of
FUN-AD and kNN on the class tokens, eval, table).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image


def make(out: Path, normal: int, per_digit: int, size: int, seed: int) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255).clip(0, 255).astype(np.uint8)  # 0..16 grey levels
    rng = np.random.default_rng(seed)

    def save(img: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        big = Image.fromarray(255 - img).resize((size, size), Image.NEAREST)  # dark ink on white, like a scan
        big.convert("RGB").save(path)

    normals = rng.permutation(np.flatnonzero(digits.target == normal))
    n_train = int(round(0.6 * len(normals)))
    for k, i in enumerate(normals[:n_train]):
        save(images[i], out / "train" / "good" / f"{k:04d}.png")
    for k, i in enumerate(normals[n_train:]):
        save(images[i], out / "test" / "good" / f"{k:04d}.png")
    k = 0
    for d in range(10):
        if d == normal:
            continue
        for i in rng.choice(np.flatnonzero(digits.target == d), size=per_digit, replace=False):
            save(images[i], out / "test" / "anomaly" / f"{k:04d}.png")
            mask = out / "ground_truth" / "anomaly" / f"{k:04d}_mask.png"
            mask.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((size, size), 255, np.uint8)).save(mask)
            k += 1
    print(f"{out}: digit {normal} normal, {n_train} train/good, {len(normals) - n_train} test/good, "
          f"{k} test/anomaly ({per_digit} of each other digit), {size} px")


def table(reports: list[Path]) -> str:
    by_method: dict[str, list[float]] = defaultdict(list)
    rows = []
    for r in reports:
        m = json.loads((r / "metrics.json").read_text())
        config = json.loads((Path(m["model_dir"]) / "config.json").read_text())
        name = f"{config['method']} ({config.get('tokens', 'patch')} tokens)"
        by_method[name].append(100 * m["image_auroc"])
        rows.append(f"| {name} | {config['seed']} | {config['contamination']['n_moved']} | "
                    f"{100 * m['image_auroc']:.1f} | {100 * m['image_ap']:.1f} | "
                    f"{'absent' if m.get('pixel_auroc') is None else m['pixel_auroc']} |")
    lines = ["| method | seed | moved anomalies | image AUROC | image AP | pixel AUROC |", "|---|---|---|---|---|---|",
             *rows, "", "| method | image AUROC, mean ± std over seeds |", "|---|---|"]
    for name, vals in by_method.items():
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(f"| {name} | {statistics.mean(vals):.1f} ± {sd:.1f} (n={len(vals)}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("out", type=Path)
    mk.add_argument("--normal", type=int, default=0)
    mk.add_argument("--per-digit", type=int, default=10)
    mk.add_argument("--size", type=int, default=64)
    mk.add_argument("--seed", type=int, default=0)
    tb = sub.add_parser("table")
    tb.add_argument("reports", type=Path, nargs="+")
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.out, a.normal, a.per_digit, a.size, a.seed)
    else:
        print(table(a.reports))


if __name__ == "__main__":
    main()
