"""Learning curves from model directories fitted with ``funad fit --eval-every N``.

Reads each directory's train_log.jsonl and prints, per measured epoch, the
test image / pixel AUROC and AUPRO (mean ± std over the directories, e.g. one
per seed) with the bank size and purity of that epoch. A diagnostic: these
numbers use test labels and select nothing.

    python benchmarks/learning_curve.py runs/seed0 runs/seed1 runs/seed2 > benchmarks/results/learning-curve.md
    python benchmarks/learning_curve.py runs/seed0 runs/seed1 runs/seed2 --plot curve.png   # also a picture
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def plot(path: Path, logs: dict, epochs: list, title: str) -> None:
    """Test image / pixel AUROC per epoch, mean and the band of ± one std over the fits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for key, name in (("test_image_auroc", "image AUROC"), ("test_pixel_auroc", "pixel AUROC")):
        values = [[100 * r[key] for log in logs.values() for r in log if r["epoch"] == e and key in r] for e in epochs]
        mean = np.array([np.mean(v) for v in values])
        std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values])
        ax.plot(epochs, mean, marker="o", label=name)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test AUROC (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = sys.argv[1:]
    plot_path = None
    if "--plot" in args:
        i = args.index("--plot")
        plot_path = Path(args[i + 1])
        del args[i:i + 2]
    dirs = [Path(d) for d in args]
    if not dirs:
        raise SystemExit(__doc__)
    logs = {d: [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines() if line.strip()]
            for d in dirs}
    config = json.loads((dirs[0] / "config.json").read_text())
    epochs = sorted({r["epoch"] for log in logs.values() for r in log if "test_image_auroc" in r})
    if not epochs:
        raise SystemExit("no epoch carries test metrics; fit with --eval-every N")

    def cell(values: list[float], pct: bool = True) -> str:
        v = np.asarray(values, dtype=float) * (100 if pct else 1)
        if not len(v):
            return "n/a"
        return f"{v.mean():.1f}" + (f" ± {v.std(ddof=1):.1f}" if len(v) > 1 else "")

    split = config["contamination"]
    if plot_path is not None:
        plot(plot_path, logs, epochs, f"{Path(config['cache']['path']).name}, {100 * split['ratio']:g}% contamination, "
             f"{len(dirs)} seed(s): mean ± std\n(a diagnostic on test labels; it selects nothing)")
    print(f"Command: `python benchmarks/learning_curve.py {' '.join(map(str, dirs))}`; model directories from "
          f"`funad fit CACHE --contamination {split['ratio']} {'--overlap' if split['overlap'] else '--no-overlap'} "
          f"--seed S --eval-every N` (preset `{config.get('preset')}`: "
          + ", ".join(f"{k}={config['config'].get(k)}" for k in ("epochs", "max_iterations", "bank_every", "bank_pool", "ema",
                                                                  "bank_patches", "batch_patches", "bank_rule", "lr",
                                                                  "scorer"))
          + f"; {len(dirs)} fit(s)). Test metrics are a "
          "diagnostic on test labels; nothing was selected with them (the final epoch is the model).\n")
    averaged = any("test_image_auroc_last_weights" in r for log in logs.values() for r in log)
    if averaged:
        print(f"The model's weights are a moving average (ema={config['config'].get('ema')}); the last weights of "
              "the same fits are beside them (image / pixel AUROC).\n")
    logit = any("test_pixel_auroc_logit" in r for log in logs.values() for r in log)
    localnet = any("test_pixel_auroc_localnet" in r for log in logs.values() for r in log)
    if localnet:
        print(f"The model scores with `scorer={config['config'].get('scorer')}`: each point built the clean-image "
              "bank from that epoch's weights. The Local-Net's own scores of the same weights are beside them.\n")
    extra = (" | last weights: image / pixel AUROC" if averaged else "") + (
        " | logit scores: pixel AUROC / AUPRO" if logit else "") + (
        " | Local-Net scores: image / pixel AUROC / AUPRO" if localnet else "")
    print(f"| epoch | image AUROC | pixel AUROC | AUPRO@0.3{extra} | bank images | bank purity | pseudo recall |")
    print("|---|---|---|---|---|---|---|" + ("---|" if averaged else "") + ("---|" if logit else "")
          + ("---|" if localnet else ""))
    for e in epochs:
        rows = [r for log in logs.values() for r in log if r["epoch"] == e and "test_image_auroc" in r]
        last = ""
        if averaged:
            last = (f" | {cell([r['test_image_auroc_last_weights'] for r in rows])} / "
                    f"{cell([r['test_pixel_auroc_last_weights'] for r in rows])}")
        if logit:
            last += (f" | {cell([r['test_pixel_auroc_logit'] for r in rows if 'test_pixel_auroc_logit' in r])} / "
                     f"{cell([r['test_aupro_logit'] for r in rows if 'test_aupro_logit' in r])}")
        if localnet:
            last += "".join((" | " if k == "image_auroc" else " / ")
                            + cell([r[f"test_{k}_localnet"] for r in rows if f"test_{k}_localnet" in r])
                            for k in ("image_auroc", "pixel_auroc", "aupro"))
        print(f"| {e} | {cell([r['test_image_auroc'] for r in rows])} | {cell([r['test_pixel_auroc'] for r in rows])} "
              f"| {cell([r['test_aupro'] for r in rows])}{last} | {cell([r['bank_images'] for r in rows], False)} "
              f"| {cell([r['bank_purity'] for r in rows if r.get('bank_purity') is not None], False)} "
              f"| {cell([r['pseudo_recall'] for r in rows if r.get('pseudo_recall') is not None], False)} |")

if __name__ == "__main__":
    main()
