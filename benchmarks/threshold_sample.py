"""What choosing the image threshold from a sample of the training images costs, without refitting.

``funad fit`` chooses its thresholds from at most ``THRESHOLD_IMAGES`` (256) training images, drawn at random
(``pipelines/thresholds.py``). No dev set here has more than 256 training images, so this simulates smaller
samples on finished sweep cells instead: each training image's held-out score does not depend on which others
are scored, so a sample of the saved scores is exactly what a fit scoring that sample would see. For every cell
and sample size it draws ``--draws`` seeded samples, applies the cell's own rule (the default: quantile) and
reports image F1 at that threshold as a share of F1 at the threshold from every training image.

    python benchmarks/threshold_sample.py SWEEP_DIR [SWEEP_DIR ...] [--sizes 32,64,128] [--draws 200] [--match TEXT]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from funad import threshold as T


def cells(folder: Path, match: list[str]):
    """(setting, training image scores, test labels, test image scores, rule) of each cell of a sweep folder."""
    for f in sorted((folder / "cells").glob("*.json")):
        if match and not any(m in f.stem for m in match):
            continue
        d = json.loads(f.read_text())
        params = {k: v for k, v in d["threshold"]["params"].items()
                  if k in ("name", "expected_contamination", "mad_k", "scale")}
        setting = f"{folder.name}: " + "_".join(p for p in f.stem.split("_") if not p.startswith(("seed=", "cfg=")))
        yield (setting, np.array(d["threshold"]["training_scores"]["image_scores"]), np.array(d["test_labels"]),
               np.array(d["test_image_scores"]), T.ThresholdRule(**params))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+", type=Path)
    ap.add_argument("--sizes", default="32,64,128")
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--match", action="append", default=[])
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    found = [c for s in args.sweeps for c in cells(s, args.match)]
    if not found:
        raise SystemExit("no sweep cell found (sweep folders need cells/*.json)")
    shares: dict = defaultdict(lambda: defaultdict(list))
    n_train: dict = defaultdict(set)
    for setting, train, labels, test, rule in found:
        full = T.at_threshold(labels, test, rule.threshold(train))["f1"]
        n_train[setting].add(len(train))
        rng = np.random.default_rng(0)
        for m in sizes:
            if m >= len(train):
                continue
            for _ in range(args.draws):
                f1 = T.at_threshold(labels, test, rule.threshold(rng.choice(train, size=m, replace=False)))["f1"]
                shares[setting][m].append(f1 / full if full > 0 else float("nan"))
    print(f"Image F1 at the threshold from a random sample of m training images, as a share of F1 at the threshold "
          f"from all of them: mean, and 5th percentile, over {args.draws} draws per fit and the fits of a setting.\n")
    print("| setting | fits | training images | " + " | ".join(f"m = {m}" for m in sizes) + " |")
    print("|---|---|---|" + "---|" * len(sizes))
    for setting, by_m in sorted(shares.items()):
        fits = sum(1 for c in found if c[0] == setting)
        row = [f"{np.nanmean(by_m[m]):.3f} ({np.nanpercentile(by_m[m], 5):.3f})" if by_m.get(m) else "n/a"
               for m in sizes]
        print(f"| {setting} | {fits} | {'/'.join(map(str, sorted(n_train[setting])))} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
