"""``funad fit``: train FUN-AD (or kNN) on a feature cache and write a model directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import click
from rich.table import Table

from funad.pipelines.settings import (DEFAULT_PIXEL_QUANTILE, DEFAULT_PRESET, DEFAULT_RULE, FIELDS, PRESETS,
                                     RULE_CHOICES, ConfigError, parse_setting, settings_table)

from .common import LazyChoice, RichProgress, console, stdout_console, user_errors


def _methods() -> tuple:
    from funad.pipelines.modeldir import METHODS  # imports torch: only when --method is checked or listed

    return METHODS


def parse_sets(values: tuple[str, ...], method: str = "funad") -> tuple[tuple[str, Any], ...]:
    """``("lambda_=1", "r=0.25")`` -> ``(("lambda_", 1.0), ("r", 0.25))``, typed like FunADConfig
    (or like the baseline ``method``'s settings, e.g. ``noise_ratio`` for softpatch).

    A misspelt name or a bad value raises click.BadParameter naming it.
    """
    out: dict[str, Any] = {}
    for item in values:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint="--set")
        try:
            out[name] = parse_setting(name, text.strip(), method)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--set") from None
    return tuple(sorted(out.items()))


# Options that define the fit; on --resume and --from-model those not given take the recorded value.
_SPEC_OPTIONS = ("method", "preset", "epochs", "seed", "contamination", "overlap", "coreset_ratio", "select",
                 "threshold_rule", "expected_contamination", "pixel_quantile", "synthetic", "tokens")


def _show(value: Any) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _list_settings(ctx: click.Context, _param, value: bool) -> None:
    """--list-settings: every FunADConfig field with its default, each preset's value and its meaning."""
    if not value or ctx.resilient_parsing:
        return
    rows = settings_table()
    presets = list(rows[0]["presets"]) if rows else []
    table = Table(title="FunADConfig fields (--set NAME=VALUE)", title_justify="left",
                  caption=f"--preset picks a column (default: {DEFAULT_PRESET}); 'paper' is the faithful algorithm",
                  caption_justify="left")
    table.add_column("field", no_wrap=True)
    table.add_column("default", justify="right", no_wrap=True)
    for name in presets:
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("meaning")
    for r in rows:
        marks = [_show(r["presets"][p]) + ("" if r["presets"][p] == r["default"] else " *") for p in presets]
        table.add_row(r["name"], _show(r["default"]), *marks, r["meaning"])
    stdout_console.print(table)
    stdout_console.print("* differs from the default")
    ctx.exit(0)


def _recorded_options(model_dir: Path) -> Optional[dict]:
    try:
        return json.loads((model_dir / "config.json").read_text()).get("options")
    except (OSError, json.JSONDecodeError):
        return None


@click.command("fit")
@click.argument("cache_path", metavar="CACHE", type=click.Path(path_type=Path))
@click.option("-o", "--output", "model_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Model directory to write (weights, config.json, train_log.jsonl, checkpoint.pt).")
@click.option("--method", default="funad", show_default=True, type=LazyChoice(_methods),
              help="FUN-AD, or a baseline: knn (PatchCore on the cached features) or softpatch (SoftPatch, "
                   "NeurIPS 2022: patch-level denoising before the coreset).")
@click.option("--preset", default=DEFAULT_PRESET, show_default=True, type=click.Choice(sorted(PRESETS)),
              help="FUN-AD settings bundle: 'paper' is the faithful algorithm; 'fast' trains faster and keeps the "
                   "paper's scores (the Local-Net's output); 'cleaned' trains as 'fast' does for half its "
                   "iterations and scores with a kNN over the training images the final Local-Net scores lowest "
                   "(README, 'Presets').")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE",
              help=f"Override one FunADConfig field (repeatable), e.g. --set lambda_=1 --set bank_every=4. "
                   f"Fields: {', '.join(FIELDS)}. Defaults and presets: --list-settings. The baselines take "
                   f"their own settings, e.g. --method softpatch --set noise_ratio=0.1 --set weighting=gaussian "
                   f"(all in funad/pipelines/baselines.py).")
@click.option("--list-settings", is_flag=True, is_eager=True, expose_value=False, callback=_list_settings,
              help="Show every FunADConfig field with its default, each preset's value and its meaning, and exit.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Override the preset's number of epochs. The fast and cleaned presets cap the training steps "
                   "(max_iterations 420 and 210: 230 training images run 30 of the default's 60 epochs), so a "
                   "larger training set runs fewer (the fit says so); --set max_iterations=none lifts the cap.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the contamination draw and the training (same seed on the CPU = identical weights).")
@click.option("--contamination", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              metavar="RATIO", help="Anomaly-to-normal ratio of test anomalies moved into training (0.1 = 10%).")
@click.option("--overlap/--no-overlap", default=False, show_default=True,
              help="Keep the moved anomalies in the test set as well (the paper's 'overlap' setting).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--resident", default="auto", show_default=True, type=click.Choice(["auto", "memory", "stream"]),
              help="Training features: in memory (GPU when it fits), streamed from the store, or chosen by size.")
@click.option("--coreset-ratio", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="knn/softpatch: keep this fraction of the training patches (PatchCore's approximate greedy "
                   "coreset); default 0.1; 1 keeps the full bank.")
@click.option("--select", default="final", show_default=True, type=click.Choice(["final", "oracle"]),
              help="'final' keeps the last epoch. 'oracle' picks the epoch by TEST AUROC (paper protocol; diagnostic only).")
@click.option("--threshold-rule", default=DEFAULT_RULE, show_default=True, type=click.Choice(list(RULE_CHOICES)),
              help="How the decision thresholds are chosen from the unlabelled training scores at the end of the "
                   "fit: quantile = flag the --expected-contamination share of the training images, otsu = Otsu's "
                   "two-class split of the scores, mad = median + 3 robust standard deviations; auto = mad for "
                   "the default preset's clean-image kNN, quantile otherwise (or quantile whenever "
                   "--expected-contamination is given). Every rule's threshold is recorded.")
@click.option("--expected-contamination", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.1,
              show_default=True, metavar="SHARE",
              help="Share of the training images expected to be anomalous (--threshold-rule quantile flags it; "
                   "giving it makes 'auto' the quantile rule). 0.1 was used for true shares of 9% (bottle) and "
                   "13% (KolektorSDD).")
@click.option("--pixel-quantile", type=click.FloatRange(0.0, 1.0, min_open=True), default=None, metavar="Q",
              help="The pixel threshold (heatmap outlines, pixel decisions): this quantile of the anomaly-map "
                   "maxima of the training images the image threshold calls normal [default: "
                   f"{'their maximum' if DEFAULT_PIXEL_QUANTILE is None else DEFAULT_PIXEL_QUANTILE}]. 1 = their "
                   "maximum: no training image called normal shows a pixel above it.")
@click.option("--synthetic/--no-synthetic", default=None,
              help="Train on the cache's FUN-AD* synthetic anomalies (funad extract --synthetic), unlabelled and "
                   "pseudo-labelled like the rest [default: yes when the cache holds them]; --synthetic on a cache "
                   "without them is an error. --set synthetic=mask uses their masks as labels instead.")
@click.option("--tokens", type=click.Choice(["patch", "class"]), default="patch", show_default=True,
              help="patch: the paper's patch features; class: the image-level variant on the class tokens alone "
                   "(P = 1; eval then reports image metrics only).")
@click.option("--resume", is_flag=True, help="Continue the unfinished fit in MODEL_DIR from its checkpoint.")
@click.option("--from-model", "from_model", type=click.Path(path_type=Path, file_okay=False), default=None,
              metavar="MODEL",
              help="Take the Local-Net trained in the finished model directory MODEL instead of training one, and "
                   "score with it anew: with other settings that act after training (--set scorer, clean_share, "
                   "clean_coreset, clean_max_patches, score_space; --preset fast or cleaned) or other threshold "
                   "options. Options not given are MODEL's; a change to anything else is refused.")
@click.option("--overwrite", is_flag=True, help="Replace an existing model directory.")
@click.option("--keep-checkpoint", is_flag=True,
              help="Keep checkpoint.pt (training state, for --resume) beside the finished model; it is removed "
                   "otherwise. Only a kept checkpoint lets --resume --epochs N train a finished model on.")
@click.option("--eval-every", type=click.IntRange(min=1), default=None, metavar="N",
              help="Diagnostic: every N epochs, log the TEST image/pixel AUROC and AUPRO in train_log.jsonl to see "
                   "where training saturates. Uses test labels; selects nothing (the final epoch is kept).")
@user_errors
def fit(cache_path: Path, model_dir: Path, method: str, preset: str, sets: tuple[str, ...], epochs: Optional[int],
        seed: int, contamination: float, overlap: bool, device: str, resident: str, coreset_ratio: Optional[float],
        select: str, threshold_rule: str, expected_contamination: float, pixel_quantile: Optional[float],
        synthetic: Optional[bool], tokens: str,
        resume: bool, from_model: Optional[Path], overwrite: bool, keep_checkpoint: bool,
        eval_every: Optional[int]) -> None:
    """Fit a model on the features in CACHE and write it to MODEL_DIR.

    \b
    Test anomalies can be moved into the unlabelled training set to measure
    robustness to contamination (--contamination, --overlap); the moved
    images are recorded in config.json. The final epoch is kept.
    Ctrl-C writes a checkpoint of the last finished epoch; continue with
    --resume. --from-model MODEL scores a trained model anew, e.g. with
    another clean_share, without training it again.
    """
    from funad.pipelines.fit import FitSpec, fit as run_fit

    options = {"method": method, "preset": preset, "epochs": epochs, "seed": seed,
               "contamination": contamination, "overlap": overlap, "coreset_ratio": coreset_ratio, "select": select,
               "threshold_rule": threshold_rule, "expected_contamination": expected_contamination,
               "pixel_quantile": DEFAULT_PIXEL_QUANTILE if pixel_quantile is None else pixel_quantile,
               "synthetic": synthetic, "tokens": tokens}
    recorded = _recorded_options(from_model) if from_model is not None else \
        _recorded_options(model_dir) if resume else None
    if from_model is not None and recorded is None:
        from funad.pipelines.modeldir import read_config

        read_config(from_model)  # names what is missing or unreadable
        raise click.BadParameter(f"{from_model / 'config.json'} records no fit options; fit it again with this "
                                 "version of funad", param_hint="--from-model")
    ctx = click.get_current_context()
    given = {name for name in _SPEC_OPTIONS if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    if recorded:
        for name in set(_SPEC_OPTIONS) - given:
            options[name] = recorded.get(name, options[name])
    if "expected_contamination" in given and options["threshold_rule"] == DEFAULT_RULE:
        options["threshold_rule"] = "quantile"  # a guess of the share is asked for by the rule that uses it
    if from_model is not None and options["method"] != "funad":
        raise click.BadParameter(f"takes the Local-Net of a FUN-AD fit, and a {options['method']} model trains "
                                 "none; fit the baseline without --from-model", param_hint="--from-model")
    overrides = parse_sets(sets, options["method"])
    if recorded:
        # --set on --resume or --from-model adds to the recorded overrides (the pipeline refuses what it must).
        overrides = tuple(sorted({**(recorded.get("overrides") or {}), **dict(overrides)}.items()))
    if options["method"] == "funad" and options["coreset_ratio"] is not None:
        raise click.BadParameter("applies to the baselines (e.g. --method knn) only", param_hint="--coreset-ratio")
    spec = FitSpec(method=options["method"], preset=options["preset"], overrides=overrides, epochs=options["epochs"],
                   seed=options["seed"], contamination=options["contamination"], overlap=options["overlap"],
                   coreset_ratio=options["coreset_ratio"], select=options["select"],
                   threshold_rule=options["threshold_rule"], expected_contamination=options["expected_contamination"],
                   pixel_quantile=options["pixel_quantile"], synthetic=options["synthetic"], tokens=options["tokens"])
    with RichProgress() as progress:
        result = run_fit(cache_path, model_dir, spec, device=device, resident=resident, resume=resume,
                         overwrite=overwrite, keep_checkpoint=keep_checkpoint, eval_every=eval_every,
                         trained_from=from_model, progress=progress)
    split = result.config["contamination"]
    console.print(
        f"[green]model written to {model_dir}[/] ({spec.method}"
        f"{', preset ' + spec.preset if spec.method == 'funad' else ''}, {split['n_train']} training images, "
        f"{split['n_moved']} moved anomalies"
        + (f", {len(split['synthetic_ids'])} synthetic anomalies" if split.get("synthetic_ids") else "")
        + (", class tokens only" if spec.tokens == "class" else "") + f", {result.seconds:.1f} s"
        + (f", with the Local-Net trained in {from_model}" if from_model is not None else "") + ")"
    )
    thr = result.config.get("threshold")
    if thr:
        scored, of = thr['training_scores']['image']['n'], thr.get('training_images')
        console.print(f"unlabelled thresholds ({thr['rule']} rule on {scored}"
                      f"{f' of {of} (a random sample)' if of and of > scored else ''} training images, no labels "
                      f"used): image {thr['image']:.6g}, pixel {thr['pixel']:.6g}")
    kept = result.config.get("clean_bank")
    if kept:
        console.print(f"clean-image bank: the {kept['images']} training images the Local-Net scores lowest, "
                      f"{kept['bank_patches']} patches"
                      + (f"; the cache's labels (read only for this line) call "
                         f"{kept['images'] - kept['anomalous_kept']} of them normal" if "normal_share" in kept else ""))
    oracle = result.config.get("oracle")
    if oracle:
        console.print(f"[bold red]ORACLE selection: epoch {oracle['epoch']} was chosen with TEST labels (image "
                      f"AUROC {oracle['image_auroc']:.4f}, pixel AUROC {oracle['pixel_auroc']:.4f}); results from "
                      f"this model are not comparable with final-epoch ones.[/]")
