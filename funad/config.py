"""Hyperparameters of FUN-AD, named after the paper's symbols.

Defaults follow ``FUNAD_SPEC.md`` ("Defaults"), which restores the paper's
values (Sec. 4, supplement Tables 3-4) and the authors' training script
(``-b 32 --k_number 2 --epoch 1500 --weight 2.5``).

Fields below the line "speed options" are deviations from the faithful
algorithm. Each is off in ``PRESETS["paper"]`` and its accuracy cost is
measured in BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Optional

from .errors import ConfigError

SELF_EXCLUSIONS = ("auto", "distance", "identity")
BANK_RULES = ("minmax", "rank")


SYNTHETIC_MODES = ("off", "pseudo", "mask")  # FunADConfig.synthetic
SCORE_SPACES = ("probability", "logit")  # FunADConfig.score_space
SCORERS = ("localnet", "clean_knn")  # FunADConfig.scorer


@dataclass(frozen=True)
class FunADConfig:
    # --- the algorithm (paper symbols) ---
    tau_b: float = 0.5  # τ_b: memory-bank candidate threshold on min-max normalised image scores (Sec. 4.1, Eq. 4)
    r: float = 0.5  # r: fraction of candidate images sampled into the bank (supp. Table 4)
    tau_n: float = 0.5  # τ_n: patch pseudo-label threshold on normalised NN distance (Sec. 4.1)
    tau_c: float = 0.9  # τ_c: confident-anomaly threshold; τ_n < d̂ < τ_c is perturbed (Sec. 4.3)
    lambda_: float = 2.5  # λ: weight of the mutual-smoothness loss (Eq. 9, supp. Table 3)
    k: int = 2  # k: neighbours searched in the bank; the nearest that is not the patch itself is used
    self_eps: float = 1e-2  # squared distances below this count as the patch finding itself (reference code)
    self_exclusion: str = "auto"  # "distance" (self_eps rule), "identity" (same image+patch), "auto": identity iff bank_every > 1
    batch_size: int = 32  # B: images per minibatch; the incomplete last batch is dropped
    epochs: int = 1500  # passes over the training set (authors' script)
    lr: float = 2e-5  # RMSprop learning rate (authors' script)
    momentum: float = 0.2  # RMSprop momentum (authors' script)
    seed: int = 0  # seeds shuffling, bank sampling, perturbation noise and initial weights
    ms_on_clean: bool = False  # paper's reading: L_ms on clean predictions (2 forward passes); False = reference code
    # --- speed options (deviations; all off in the "paper" preset) ---
    bank_every: int = 1  # rebuild the memory bank every N iterations and at each epoch's first (paper: 1)
    bank_patches: Optional[int] = None  # keep at most this many randomly chosen bank patches (paper: all)
    batch_patches: Optional[int] = None  # patches sampled per image in each step (paper: all P)
    bf16: bool = False  # bfloat16 autocast for Local-Net forward passes and searches (paper: fp32)
    bank_pool: Optional[int] = None  # each rebuild scores at most this many randomly drawn images (paper: all)
    bank_rule: str = "minmax"  # bank candidates: Ŝ < τ_b after min-max (paper), or "rank": the τ_b share scoring lowest
    max_iterations: Optional[int] = None  # cap on epochs x steps: fewer epochs on large training sets (paper: none)
    ema: Optional[float] = None  # keep an exponential moving average of the Local-Net weights with this decay and use it for inference (paper: none, the last weights)
    score_space: str = "probability"  # inference only: patch scores are φ's sigmoid output (paper) or its logit, which orders patches the same but does not saturate at 1.0 before maps are upsampled and smoothed; training is unchanged
    # --- inference (a deviation; "localnet" in the "paper" preset) ---
    scorer: str = "localnet"  # "localnet": a patch scores φ(f) (paper); "clean_knn": after training, the final φ keeps the clean_share of training images it scores lowest, and a patch scores its distance to their raw features (PatchCore-style coreset bank, funad.knn); training is unchanged
    clean_share: float = 0.5  # scorer="clean_knn": the share of training images, lowest image scores first, whose features form the bank
    clean_coreset: float = 0.1  # scorer="clean_knn": the coreset ratio of that bank (1 keeps every patch)
    clean_max_patches: Optional[int] = None  # scorer="clean_knn": at most this many bank patches (None: no cap), so that scoring costs the same however many images trained the model
    # --- FUN-AD* (paper Sec. 5.3) ---
    synthetic: str = "pseudo"  # synthetic anomaly images in the training data: "pseudo" = unlabelled and pseudo-labelled like the rest, no L_ms gradient through them (paper); "mask" = their Perlin masks as labels (supp. Table 5); "off" = left out

    def __post_init__(self) -> None:
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        check(0.0 <= self.tau_b <= 1.0, f"tau_b must lie in [0, 1], got {self.tau_b}")
        check(0.0 < self.r <= 1.0, f"r must lie in (0, 1], got {self.r}")
        check(0.0 <= self.tau_n <= 1.0, f"tau_n must lie in [0, 1], got {self.tau_n}")
        check(self.tau_n <= self.tau_c <= 1.0, f"tau_c must lie in [tau_n={self.tau_n}, 1], got {self.tau_c}")
        check(self.lambda_ >= 0.0, f"lambda_ must be >= 0, got {self.lambda_}")
        check(self.k >= 2, f"k must be >= 2 (the nearest neighbour may be the patch itself), got {self.k}")
        check(self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}")
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.bank_every >= 1, f"bank_every must be >= 1, got {self.bank_every}")
        check(self.bank_patches is None or self.bank_patches >= 2, f"bank_patches must be >= 2 or None, got {self.bank_patches}")
        check(self.batch_patches is None or self.batch_patches >= 1, f"batch_patches must be >= 1 or None, got {self.batch_patches}")
        check(self.self_exclusion in SELF_EXCLUSIONS,
              f"self_exclusion must be one of {list(SELF_EXCLUSIONS)}, got {self.self_exclusion!r}")
        check(self.bank_pool is None or self.bank_pool >= 1, f"bank_pool must be >= 1 or None, got {self.bank_pool}")
        check(self.bank_rule in BANK_RULES, f"bank_rule must be one of {list(BANK_RULES)}, got {self.bank_rule!r}")
        check(self.max_iterations is None or self.max_iterations >= 1,
              f"max_iterations must be >= 1 or None, got {self.max_iterations}")
        check(self.ema is None or 0.0 <= self.ema < 1.0, f"ema must lie in [0, 1) or be None, got {self.ema}")

        check(self.score_space in SCORE_SPACES,
              f"score_space must be one of {list(SCORE_SPACES)}, got {self.score_space!r}")
        check(self.scorer in SCORERS, f"scorer must be one of {list(SCORERS)}, got {self.scorer!r}")
        check(0.0 < self.clean_share <= 1.0, f"clean_share must lie in (0, 1], got {self.clean_share}")
        check(0.0 < self.clean_coreset <= 1.0, f"clean_coreset must lie in (0, 1] (1 keeps every patch), "
                                                f"got {self.clean_coreset}")
        check(self.clean_max_patches is None or self.clean_max_patches >= 1,
              f"clean_max_patches must be >= 1 or None (no cap), got {self.clean_max_patches}")
        check(self.scorer == "localnet" or self.score_space == "probability",
              f"score_space={self.score_space!r} applies to the Local-Net's scores; scorer={self.scorer!r} scores "
              "by distance, so leave score_space at 'probability' or set scorer=localnet")
        check(self.synthetic in SYNTHETIC_MODES,
              f"synthetic must be one of {list(SYNTHETIC_MODES)}, got {self.synthetic!r}")
    @property
    def bounded_scores(self) -> bool:
        """True when scores are φ's sigmoid output in (0, 1); False for logits and kNN distances."""
        return self.scorer == "localnet" and self.score_space == "probability"

    @property
    def exclude_self_by(self) -> str:
        """The self-exclusion rule in force: "distance" or "identity".

        "auto" means by distance when the bank is rebuilt at every iteration
        (bank and batch then come from the same Local-Net, so the reference
        rule is exact) and by identity otherwise (the batch is adapted by a
        newer net than the bank, and a patch's stale copy is not at distance 0).
        """
        if self.self_exclusion != "auto":
            return self.self_exclusion
        return "distance" if self.bank_every == 1 else "identity"

    def epochs_for(self, n_images: int) -> int:
        """Epochs a fit on ``n_images`` runs: ``epochs``, fewer when ``max_iterations`` caps them."""
        if self.max_iterations is None:
            return self.epochs
        steps = max(1, n_images // self.batch_size)
        return max(1, min(self.epochs, -(-self.max_iterations // steps)))

    def replace(self, **changes: Any) -> "FunADConfig":
        """Return a copy with ``changes`` applied; unknown names raise ConfigError."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown hyperparameter(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FunADConfig":
        return cls().replace(**d)

    @classmethod
    def completed(cls, d: dict) -> dict:
        """A stored config (``to_dict`` of an older version) with every setting added since at its default,
        which is what that version ran: resuming compares settings on this dict."""
        return {**cls().to_dict(), **d}

    @staticmethod
    def parse_value(name: str, text: str) -> Any:
        """Convert a command-line string to the type of field ``name``."""
        kinds = {f.name: f for f in fields(FunADConfig)}
        if name not in kinds:
            raise ConfigError(f"unknown hyperparameter {name!r}; known: {sorted(kinds)}")
        default = getattr(FunADConfig(), name)
        if text.lower() in ("none", "null"):
            return None
        if isinstance(default, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{name} expects true/false, got {text!r}")
        try:
            if isinstance(default, str):
                return text
            if isinstance(default, int) or name in ("bank_patches", "batch_patches", "bank_pool", "max_iterations",
                                                    "clean_max_patches"):
                return int(text)
            return float(text)
        except ValueError:
            raise ConfigError(f"{name} expects a number, got {text!r}") from None


# Settings that act only after training, on how a fitted Local-Net scores: two configs that differ in nothing
# else train the same Local-Net (``FunAD.adopt_training``).
INFERENCE_SETTINGS = ("scorer", "clean_share", "clean_coreset", "clean_max_patches", "score_space")


def training_settings(config: dict) -> dict:
    """``config`` (a ``to_dict``) without :data:`INFERENCE_SETTINGS`: what decides the trained Local-Net."""
    return {k: v for k, v in config.items() if k not in INFERENCE_SETTINGS}


def effective_settings(config: dict, prefix: str = "") -> dict:
    """``config`` (a ``to_dict``, or a row whose keys carry ``prefix``) without the settings that do nothing in it.

    The Local-Net scorer ignores ``clean_share``, ``clean_coreset`` and
    ``clean_max_patches``, and ``scorer="localnet"`` is what every version
    before that setting ran; so with it, the four are dropped. So is
    ``clean_max_patches=None`` (no cap), what every version before it ran. A
    sweep identifies cells by this dict, so cells fitted before a setting
    existed are still found.
    """
    drop = set()
    if config.get(prefix + "scorer", "localnet") in ("localnet", "", None):
        drop = {"scorer", "clean_share", "clean_coreset", "clean_max_patches"}
    if config.get(prefix + "clean_max_patches") in ("", None):
        drop.add("clean_max_patches")
    return {k: v for k, v in config.items() if not (k.startswith(prefix) and k[len(prefix):] in drop)}


# Named bundles of settings. "paper" is the faithful algorithm. "fast" trades
# a measured amount of accuracy for CPU speed and keeps the paper's scores.
# The default, "cleaned", trains as "fast" does and then scores test images
# with a kNN over the training images the final Local-Net scores lowest
# (scorer="clean_knn"). Their values and what each gives up are recorded in
# BENCHMARKS.md.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "fast": {
        "epochs": 60,
        "max_iterations": 420,  # = 60 epochs of bottle (7 steps each); fewer epochs on larger training sets
        "bank_every": 14,  # plus each epoch's first step: once per epoch when an epoch has <= 14 steps
        "bank_pool": 64,  # a rebuild scores 64 images, so its cost does not grow with the training set
        "bank_patches": 4096,
        "batch_patches": 64,
        # bf16 stays off by default: on an AVX2 CPU (no AVX512-BF16) bf16 autocast ran the Local-Net
        # 2.4-7x slower than fp32; on a CPU with AMX it ran 2.1x faster and a default iteration 1.43x
        # (benchmarks/results/fit.md), with its accuracy measured in BENCHMARKS.md. --set bf16=true there
        # and on a GPU.
        "bf16": False,
        "lr": 1e-4,
    },
}
# Over 3 seeds the clean-image kNN lifted bottle at 10% from 98.6 ± 0.8 / 95.6 ± 2.0 to 100.0 / 98.7 ± 0.2
# (image / pixel AUROC) and KolektorSDD's pixel AUROC and AUPRO, for about a point of its image AUROC
# (benchmarks/results/scorer-*.md). It trains half of fast's iterations: the kNN only needs the Local-Net
# to rank the training images, and at 210 bottle scored as at 420 (to the digit) and KolektorSDD lost 0.7
# points of image AUROC, for 103 s of fit against 176 s (benchmarks/results/budget-*.md, fit-wall-epyc.md).
# fast keeps 420: the Local-Net's own scores are what it reports.
PRESETS["cleaned"] = {**PRESETS["fast"], "scorer": "clean_knn", "max_iterations": 210}
DEFAULT_PRESET = "cleaned"


def preset(name: str, **overrides: Any) -> FunADConfig:
    """Build the config of preset ``name`` with ``overrides`` applied on top."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return FunADConfig().replace(**{**PRESETS[name], **overrides})
