"""What the SmolLM2 demo trains and measures: its fine-tunes, the comparisons it reports, the pair
sets, and ``ChatDemoRecipe``, every setting of one run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from saediff.errors import SaediffError
from saediff.interventions.steer_null import NullConfig
from saediff.interventions.steer_protocol import DEFAULT_KL_BUDGET

__all__ = [
    "BLOCK_RUNS",
    "COMPARISONS",
    "DESIGN",
    "FINETUNES",
    "HELDOUT",
    "MEDICAL",
    "ChatDemoRecipe",
    "pairs_of",
    "slug",
]


FINETUNES: dict[str, tuple[Literal["full", "lora"], str]] = {
    "full_bad": ("full", "medical_bad"),
    "full_control": ("full", "medical_good"),
    "lora_bad": ("lora", "medical_bad"),
    "lora_control": ("lora", "medical_good"),
    "style_control": ("full", "style_control"),
    "benign": ("full", "benign_trait"),
}
"""each fine-tune: its method and its data set (``saediff.data.em_data.FILES``): the narrow bad-advice
fine-tune, its good-data control (same questions, safe answers), the style control (correct answers
in the bad answers' register) and the benign trait (everyday questions answered sarcastically)"""


BLOCK_RUNS = ("block_diff", "block_random")
"""BLOCK-EM: the full fine-tune on the bad data with the diff's latents held where the base model has
them, and with as many random latents"""


COMPARISONS: tuple[tuple[str, str], ...] = (
    *((name, "base") for name in (*FINETUNES, *BLOCK_RUNS)),
    ("full_bad", "full_control"),
    ("lora_bad", "lora_control"),
    ("full_bad", "style_control"),
    ("block_diff", "full_bad"),
    ("block_random", "full_bad"),
)
"""(A, B): the paired difference A - B of preferences, on each pair set"""


HELDOUT, DESIGN, MEDICAL = "offdomain:heldout", "offdomain:design", "medical"
"""the findings are reported on the held-out split, the design split beside them"""


@dataclass(frozen=True)
class ChatDemoRecipe:
    """What the demo trains and measures. The defaults are the settings the issue's probe measured on
    SmolLM2-135M-Instruct (full fine-tune lr 2e-5, rank-1 LoRA on every ``down_proj`` lr 1e-3,
    batch 4, 150 steps)."""

    finetunes: tuple[str, ...] = tuple(FINETUNES)
    """which fine-tunes to train (names of ``FINETUNES``)"""
    steps: int = 150
    """optimizer steps per fine-tune"""
    full_lr: float = 2e-5
    """learning rate of the full fine-tunes (AdamW, constant)"""
    lora_lr: float = 1e-3
    """learning rate of the LoRA fine-tunes"""
    batch_size: int = 4
    """conversations per step"""
    max_length: int = 256
    """tokens per conversation (longer ones are cut)"""
    lora_rank: int = 1
    """adapter rank of the LoRA fine-tunes"""
    lora_alpha: float = 1.0
    """LoRA alpha (scale alpha / rank)"""
    lora_modules: tuple[str, ...] = ("down_proj",)
    """modules that get adapters, in every chosen layer"""
    lora_layers: tuple[int, ...] | None = None
    """decoder layers that get adapters; None: every layer"""
    rows: int | None = None
    """train on the first N rows of each data set (None: all 400); for tests and smoke runs"""
    pair_sets: tuple[str, ...] = (DESIGN, HELDOUT, MEDICAL)
    """pair sets EM is measured on: shipped ones (``saediff.data.em_data.PAIR_SETS``) or pair files"""
    save_every: int | None = 50
    """checkpoint every N steps, so an interrupted fine-tune resumes from its newest checkpoint"""
    keep_checkpoints: bool = False
    """keep a finished full fine-tune's checkpoints (a full SmolLM2 checkpoint with its optimizer state
    is ~1.5 GB); by default they are removed once its model is saved. LoRA checkpoints are small and
    kept (the phase analysis reads them)"""
    lora_save_every: int | None = 25
    """LoRA fine-tunes checkpoint every N steps (the phase analysis' points)"""
    eval_batch_size: int = 16
    """conversations per forward of the pair metric (float rounding only)"""
    story: bool = True
    """after the fine-tunes: the SAE, the diffs, steering, BLOCK-EM and sampled answers"""
    choose_on: str = DESIGN
    """the pair set whose references the diffs read and whose first half chooses the steering scale"""
    report_on: str = HELDOUT
    """the pair set every steering and BLOCK-EM figure is reported on (never used to choose)"""
    layer: int | None = None
    """the block whose residual the SAE reads (None: the middle block, ``n_layers // 2``)"""
    sae_width: int = 2304
    """SAE latents (4 x SmolLM2's d_model 576)"""
    sae_k: int = 32
    """active latents per token (TopK)"""
    sae_steps: int = 2500
    sae_batch_size: int = 1024
    sae_held_rows: int = 40
    """the last N rows of each training set are held out of the SAE's training (its metrics)"""
    diff_top: int = 10
    """latents per side the diff keeps (the top risers for the cards and steering)"""
    icl_questions: int = 48
    """design questions of the in-context direction (3 shots each, both ways)"""
    steer_latents: int = 2
    """top diff latents steered (beside the dense directions at the SAE's block)"""
    kl_budget: float = DEFAULT_KL_BUDGET
    """the most a steering vector may cost: the mean KL(unsteered || steered) per token of neutral
    text (the base model's greedy answers to the shipped benign questions), in nats; each candidate's
    scale is searched for at the cost levels ``kl_levels`` x this"""
    kl_levels: tuple[float, ...] = (0.25, 0.5, 1.0)
    """the cost levels tried per candidate, as fractions of ``kl_budget``; the design split's first
    half picks the level with the largest effect"""
    null: NullConfig = field(default_factory=NullConfig)
    """the null each steering candidate is compared with at equal cost (isotropic and
    covariance-matched random directions, seeded independently of the fine-tune seed)"""
    style_crossed: str | None = "style_crossed"
    """the pair set every steering verdict is also reported on, its halves choosing and reporting
    (``style_crossed``: misaligned answers in the aligned references' careful register and aligned ones
    in the bad data's blunt one, 66 questions in 6 domains; or a pair file in its form, such as a slice
    of it); None: not reported"""
    ablation_randoms: int = 20
    """random unit directions (the null's isotropic draws, seeds ``null.seed + k``) projected out of
    (clamped in) both the bad fine-tune and the base model beside each candidate: the projection
    verdict's p-value is read against them (>= 19 for it to reach 0.05)"""
    block_latents: tuple[int, int] = (10, 10)
    """BLOCK-EM: latents that rose most (held down) and that fell most (held up), from the full diff"""
    block_relative_lambda: float = 1.0
    """BLOCK-EM penalty weight, relative: lambda = this / the blocked set's mean summed squared base
    activation per answer token (``chat_story.block_lambda``), per set"""
    sae_seed: int = 0
    """the SAE's training seed, the same for every fine-tune seed (latent indices stay comparable)"""

    def __post_init__(self):
        object.__setattr__(self, "finetunes", tuple(self.finetunes))
        object.__setattr__(self, "pair_sets", tuple(str(s) for s in self.pair_sets))
        object.__setattr__(self, "kl_levels", tuple(float(x) for x in self.kl_levels))
        if isinstance(self.null, dict):  # a recipe read back from summary.json
            known = {f.name for f in fields(NullConfig)}
            object.__setattr__(self, "null", NullConfig(**{k: v for k, v in self.null.items() if k in known}))
        object.__setattr__(self, "block_latents", tuple(int(x) for x in self.block_latents))
        unknown = [n for n in self.finetunes if n not in FINETUNES]
        if unknown:
            raise SaediffError(f"unknown fine-tune {unknown[0]!r}; choose from {', '.join(FINETUNES)}")
        if len(set(self.finetunes)) != len(self.finetunes) or len(set(self.pair_sets)) != len(self.pair_sets):
            raise SaediffError("ChatDemoRecipe: a fine-tune or pair set is named twice")
        if not self.pair_sets:
            raise SaediffError("ChatDemoRecipe needs at least one pair set")
        if len({slug(p) for p in self.pair_sets}) != len(self.pair_sets):
            raise SaediffError(
                f"ChatDemoRecipe: pair sets {list(self.pair_sets)} share a folder name (file stem)"
            )
        if self.story:
            missing = [n for n in ("full_bad", "lora_bad") if n not in self.finetunes]
            if missing:
                raise SaediffError(
                    f"ChatDemoRecipe: the story's diffs and BLOCK-EM need the {missing[0]} fine-tune "
                    "(or story=False)"
                )
            if (
                not {self.choose_on, self.report_on} <= set(self.pair_sets)
                or self.choose_on == self.report_on
            ):
                raise SaediffError(
                    f"ChatDemoRecipe: the story chooses on {self.choose_on} and reports on "
                    f"{self.report_on}: two different sets among pair_sets (or story=False: "
                    "saediff demo --finetunes-only)"
                )
            if self.sae_held_rows < 1 or self.diff_top < 1 or self.icl_questions < 1:
                raise SaediffError("ChatDemoRecipe: sae_held_rows, diff_top and icl_questions must be >= 1")
            if not self.lora_save_every or self.steps // self.lora_save_every < 2:
                raise SaediffError(
                    f"ChatDemoRecipe: the phase analysis needs >= 2 LoRA checkpoints: lora_save_every "
                    f"{self.lora_save_every} with {self.steps} steps"
                )
            if (
                self.kl_budget <= 0
                or not self.kl_levels
                or not 0 < min(self.kl_levels) <= max(self.kl_levels) <= 1
            ):
                raise SaediffError(
                    f"ChatDemoRecipe: kl_budget must be > 0 and kl_levels in (0, 1], got {self.kl_budget} "
                    f"and {self.kl_levels}"
                )
            if sum(self.block_latents) < 1:
                raise SaediffError("ChatDemoRecipe: block_latents must hold a latent")
            if self.ablation_randoms < 1:
                raise SaediffError(
                    f"ChatDemoRecipe: ablation_randoms must be >= 1, got {self.ablation_randoms}"
                )
        if self.rows is not None and self.rows < 1:
            raise SaediffError(f"ChatDemoRecipe.rows must be >= 1 or None, got {self.rows}")
        # the remaining checks (steps, lr, rank, ...) are FinetuneConfig's
        for name in self.finetunes:
            self.finetune_config(name, 0)

    @classmethod
    def quick(cls) -> ChatDemoRecipe:
        """A smoke run (``saediff demo --model M --quick``): 40 steps per fine-tune on 160 rows, a smaller
        SAE trained briefly, one steering cost level and a null of 2 + 2 random directions, 4 random
        directions beside the projections, 5 + 5 BLOCK-EM latents; the findings' bars are set for the
        full recipe and need not hold here."""
        return cls(
            steps=40,
            rows=160,
            save_every=None,
            lora_save_every=10,
            pair_sets=(DESIGN, HELDOUT, MEDICAL),
            sae_width=1152,
            sae_steps=400,
            icl_questions=16,
            steer_latents=1,
            kl_levels=(1.0,),
            null=NullConfig(n_isotropic=2, n_covariance=2),
            ablation_randoms=4,
            block_latents=(5, 5),
        )

    def finetune_config(self, name: str, seed: int):
        """The ``FinetuneConfig`` of fine-tune ``name`` at fine-tune seed ``seed``."""
        from saediff.interventions.finetune import FinetuneConfig

        method = FINETUNES[name][0]
        common = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "seed": seed,
        }
        if method == "full":
            return FinetuneConfig(method="full", lr=self.full_lr, save_every=self.save_every, **common)
        return FinetuneConfig(
            method="lora",
            lr=self.lora_lr,
            save_every=self.lora_save_every,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_modules=tuple(self.lora_modules),
            lora_layers=self.lora_layers,
            **common,
        )

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def slug(pair_set: str) -> str:
    """A pair set's folder under ``eval/NAME/``: a shipped set with ``_`` for ``:``
    (``offdomain_heldout``), a pair file by its stem."""
    from saediff.data.em_data import PAIR_SETS

    return pair_set.replace(":", "_") if pair_set in PAIR_SETS else Path(pair_set).stem


def pairs_of(pair_set: str) -> list:
    from saediff.evaluation.pairs import pair_evaluator

    return list(pair_evaluator(pair_set).pairs)
