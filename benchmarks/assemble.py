"""Assemble BENCHMARKS.md from the benchmark outputs in benchmarks/results/.

Each benchmark script prints markdown with the machine it ran on and the
command that produced it; `make bench` runs them and then this script. The
prose in benchmarks/summary.md (claims checked against the numbers) goes first.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [
    ("Quality and speed: the default's training budget (210 iterations since the fifteenth session, 420 before) "
     "and 105, bottle and KolektorSDD, full frame", "budget-bottle.md"),
    ("Quality: the training budget, KolektorSDD in full frame", "budget-ksdd.md"),
    ("Quality: the default at 210 iterations in the paper geometry, MVTec AD bottle", "budget-bottle-paper.md"),
    ("Quality: the default at 210 iterations in the paper geometry, KolektorSDD", "budget-ksdd-paper.md"),
    ("Quality: the default geometry, full frame against the paper's, MVTec AD bottle", "geometry-bottle.md"),
    ("Quality: PatchCore and SoftPatch on MVTec AD bottle in full frame", "geometry-bottle-baselines.md"),
    ("Quality: the default preset at 5% and 20% contamination, MVTec AD bottle", "contamination-bottle.md"),
    ("Quality: the default against SoftPatch and kNN, KolektorSDD in the default (full-frame) geometry",
     "ksdd-full.md"),
    ("Quality: the default preset's clean-image kNN against the Local-Net's own scores, MVTec AD bottle",
     "scorer-bottle.md"),
    ("Quality: the clean-image kNN against the Local-Net's own scores, KolektorSDD (paper geometry)", "scorer-ksdd.md"),
    ("Quality: the clean-image kNN against the Local-Net's own scores, KolektorSDD (full frame)",
     "scorer-ksdd-full.md"),
    ("Quality: how many training images the default trusts (clean_share), KolektorSDD (paper geometry)",
     "clean-share-ksdd.md"),
    ("Quality: how many training images the default trusts (clean_share), MVTec AD bottle", "clean-share-bottle.md"),
    ("Decisions without labels: thresholds from a sample of the training images", "threshold-sample.md"),
    ("Speed: what a default fit computes, phase by phase (FLOP count)", "fit-flops-bottle.md"),
    ("Speed: whole default fits on the AMD EPYC (eleventh and fourteenth sessions)", "fit-wall-epyc.md"),
    ("Speed: the default preset's fit against preset fast", "fit-wall-scorer.md"),
    ("Quality: FUN-AD, PatchCore and SoftPatch against contamination, MVTec AD bottle", "comparison-bottle.md"),
    ("Quality: FUN-AD, PatchCore and SoftPatch against contamination, KolektorSDD", "comparison-ksdd.md"),
    ("Quality: MVTec AD bottle", "quality-bottle.md"),
    ("Quality: FUN-AD on bottle at 0% and 1% contamination", "quality-bottle-low.md"),
    ("Quality: KolektorSDD", "quality-ksdd.md"),
    ("Quality: KolektorSDD in its own geometry (full frame, tiles) against squashed", "geometry.md"),
    ("Speed: the full-frame geometry (tiles) against the paper's", "geometry-speed.md"),
    ("Speed: making FUN-AD* synthetic images against the forward pass", "synthetic-speed.md"),
    ("Speed: extract", "extract.md"),
    ("Fit: what each deviation costs at P = 196 (ablation), bottle", "ablation-bottle196.md"),
    ("Fit: what each deviation costs at P = 196 (ablation), KolektorSDD", "ablation-ksdd196.md"),
    ("Fit: the faithful loop and the default at 20 epochs (a second budget), bottle", "ablation-bottle196-e20.md"),
    ("Fit: the faithful loop and the default at 20 epochs (a second budget), KolektorSDD", "ablation-ksdd196-e20.md"),
    ("Fit: the faithful loop and the default at 60 epochs on the machine of the 20-epoch table, KolektorSDD",
     "ablation-ksdd196-zen5.md"),
    ("Fit: learning curve (test AUROC per epoch, diagnostic)", "learning-curve.md"),
    ("Decisions without labels: threshold rules against F1-max", "thresholds.md"),
    ("Decisions without labels: pixel-threshold rules against pixel F1-max", "pixel-thresholds.md"),
    ("FUN-AD* (synthetic anomalies) and the class-token variant", "synthetic.md"),
    ("FUN-AD* against FUN-AD: MVTec AD bottle", "synthetic-bottle.md"),
    ("FUN-AD* against FUN-AD: KolektorSDD", "synthetic-ksdd.md"),
    ("FUN-AD* on KolektorSDD: where the pseudo-anomalies go", "synthetic-labels-ksdd.md"),
    ("Speed: the default preset's iteration at 1,000 training images", "scale.md"),
    ("Speed: whole default fits at 230 and 1,000 training images", "scale-fit.md"),
    ("Speed: fit iteration, phase by phase", "fit.md"),
    ("Speed: the authors' training loop against funad's faithful one", "authors-loop.md"),
    ("Speed: whole fits of preset fast (the default until the ninth session), wall time", "fit-wall.md"),
    ("Quality: bf16 autocast against fp32", "bf16-quality.md"),
    ("Speed: feature residency in fit", "fit-pipeline.md"),
    ("Speed: predict", "predict.md"),
    ("Speed: evaluation maths", "evaluation.md"),
    ("Speed: PatchCore's coreset and scoring on the bottle bank", "coreset.md"),
    ("Storage: compression choice", "cache.md"),
    ("Storage: store against the raw disk", "store.md"),
]


def main() -> None:
    parts = ["# Benchmarks\n",
             "Regenerate with `make bench` (speed) and `make bench-quality` (quality grid), "
             "which rewrite `benchmarks/results/*.md` and then this file. Every figure below "
             "names the command and machine it came from.\n"]
    summary = HERE / "summary.md"
    if summary.exists():
        parts.append(summary.read_text())
    for title, name in ORDER:
        path = HERE / "results" / name
        body = path.read_text().strip() if path.exists() else f"_not run yet: `{name}` is missing_"
        # demote the scripts' own top-level headings below this section's
        body = "\n".join(("##" + line) if line.startswith("#") else line for line in body.splitlines())
        parts.append(f"## {title}\n\n{body}\n")
    (HERE.parent / "BENCHMARKS.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
