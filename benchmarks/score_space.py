"""Probability against logit patch scores on fitted FUN-AD models (same weights, inference only).

FUN-AD's patch score is the Local-Net's sigmoid output. Where it saturates at
1.0 in float32, neighbouring patches tie before the map is upsampled and
smoothed; the logit orders patches the same way without ties. This scores
each model's test split both ways, exactly as ``funad eval`` does, and prints
one markdown row per model plus mean ± std over them.

    python benchmarks/score_space.py runs/curves/bottle_s0 runs/curves/bottle_s1 runs/curves/bottle_s2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from funad import cache
from funad.pipelines import modeldir
from funad.pipelines.evaluate import resolve_cache_path
from funad.pipelines.oracle import TestScorer

SPACES = ("probability", "logit")
KEYS = ("image_auroc", "pixel_auroc", "aupro")


def measure_dir(path: Path) -> dict:
    model, info = modeldir.load_model_dir(path)
    if info.method != "funad":
        raise SystemExit(f"{path}: a {info.method} model; score_space applies to FUN-AD only")
    state = model.state_dict()
    out = {}
    with cache.open(resolve_cache_path(info, None), mode="r") as store:
        for space in SPACES:
            config = {**state["config"], "score_space": space}
            scorer = TestScorer(config, store, info.test_ids, torch.device("cpu"))
            out[space] = scorer.metrics(scorer.model(state))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dirs", nargs="+", type=Path)
    args = ap.parse_args(argv)
    rows = {space: [] for space in SPACES}
    print("Command: `python benchmarks/score_space.py " + " ".join(map(str, args.model_dirs)) + "`\n")
    print("| model | " + " | ".join(f"{k} ({s})" for s in SPACES for k in KEYS) + " |")
    print("|---|" + "---|" * (len(SPACES) * len(KEYS)))
    for path in args.model_dirs:
        m = measure_dir(path)
        for s in SPACES:
            rows[s].append([m[s][k] for k in KEYS])
        print(f"| {path} | " + " | ".join(f"{100 * m[s][k]:.1f}" for s in SPACES for k in KEYS) + " |")
    cells = []
    for s in SPACES:
        a = 100 * np.asarray(rows[s])
        cells += [f"{a[:, j].mean():.1f} ± {a[:, j].std(ddof=1) if len(a) > 1 else 0:.1f}" for j in range(len(KEYS))]
    print(f"| mean ± std ({len(args.model_dirs)}) | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
