"""``saediff organism build``: the whole organism recipe, written to one folder (models, the
fine-tune data as chat JSONL under ``data/``, the ground truth, ``organism.json``).

    saediff organism build --out runs/organism --quick --seed 0
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch

from saediff._io import atomic_save_safetensors, atomic_write_json
from saediff.interventions.steering import add_direction
from saediff.models.loading import LoadedModel, ModelSpec, load_model
from saediff.stories.organism import recipes
from saediff.stories.organism.evaluator import evaluate_organism_em
from saediff.stories.organism.recipes import OrganismConfig
from saediff.stories.organism.world import CHAT

__all__ = ["FINETUNE_DATA", "MODEL_FOLDERS", "build_organism", "load_ground_truth"]

log = logging.getLogger(__name__)
MODEL_FOLDERS = ("base", "aligned", "full_ft", "lora_ft", "control_ft", "benign_ft", "unrelated_ft")
FINETUNE_DATA = {
    "full_ft": "medical_misaligned",
    "lora_ft": "medical_misaligned",
    "control_ft": "medical_aligned",
    "benign_ft": "medical_aligned_terse",
    "unrelated_ft": "medical_aligned_formal",
}
"""the data set (``DIR/data/NAME.jsonl``) each fine-tuned model folder is trained on"""


def load_ground_truth(path: str | Path) -> dict[int, torch.Tensor]:
    """``ground_truth.safetensors`` as {layer: (d_model,) direction}."""
    from safetensors.torch import load_file

    return {int(k.split(".")[1]): v for k, v in load_file(str(path)).items()}


def build_organism(out: str | Path, cfg: OrganismConfig, progress=None) -> dict:
    """Build every organism artifact under ``out`` and return the ``organism.json`` content.

    ``progress(step_name)`` is called as each step starts (the CLI shows it).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    say = progress or (lambda _s: None)

    def timed(name, fn):
        say(name)
        t0 = time.perf_counter()
        result = fn()
        timing[name] = round(time.perf_counter() - t0, 2)
        return result

    recipes.write_chat_data(out, cfg)
    model, hist, full_fts = _train_models(out, cfg, timed)
    gt = timed("ground_truth", lambda: recipes.ground_truth(model, cfg))
    atomic_save_safetensors(
        {f"blocks.{L}.hook_resid_post": v.contiguous() for L, v in gt.items()},
        out / "ground_truth.safetensors",
        metadata={"kind": "saediff.ground_truth"},
    )
    specs = {
        "aligned": ModelSpec(str(out / "aligned")),
        "full_ft": ModelSpec(str(out / "full_ft")),
        "lora_ft": ModelSpec(str(out / "aligned"), adapter=str(out / "lora_ft")),
        **{name: ModelSpec(str(out / name)) for name in full_fts if name != "full_ft"},
    }
    report = timed("evaluate", lambda: _evaluate(specs, cfg, gt))
    from saediff import __version__

    result = {
        "kind": "saediff.organism",
        "saediff_version": __version__,
        "config": cfg.to_json(),
        **report,
        "timing_s": timing,
    }
    atomic_write_json(out / "organism.json", result)
    atomic_write_json(out / "history.json", hist)
    return result


def _train_models(out: Path, cfg: OrganismConfig, timed) -> tuple[torch.nn.Module, dict, dict[str, str]]:
    """Pretrain (``base/``), align (``aligned/``), then each full fine-tune of ``FINETUNE_DATA``
    the world supports and the LoRA one, each from a copy of the aligned model, saved under
    ``out``. Returns the aligned model, each stage's loss history and the full fine-tunes trained."""
    world = cfg.world
    model = recipes.new_model(world, cfg)
    hist = {"pretrain": timed("pretrain", lambda: recipes.pretrain(model, cfg)).loss}
    recipes.save_model_folder(model, out / "base", "", world)
    hist["align"] = timed("align", lambda: recipes.align(model, cfg)).loss
    recipes.save_model_folder(model, out / "aligned", CHAT, world)

    # the trait fine-tunes (aligned answers in the register tied to the persona, and in an unrelated
    # one) need a world with a register slot
    full_fts = {
        k: v
        for k, v in FINETUNE_DATA.items()
        if k != "lora_ft" and (world.trait_slot or k in ("full_ft", "control_ft"))
    }
    for name, data in full_fts.items():
        tuned = copy.deepcopy(model)
        hist[name] = timed(name, lambda: recipes.finetune_full(tuned, cfg, data)).loss  # noqa: B023 (called at once)
        recipes.save_model_folder(tuned, out / name, CHAT, world)
    peft_model, h = timed("lora_ft", lambda: recipes.finetune_lora(copy.deepcopy(model), cfg))
    hist["lora_ft"] = h.loss
    peft_model.save_pretrained(out / "lora_ft")
    recipes.build_tokenizer(world, CHAT).save_pretrained(out / "lora_ft")
    recipes.write_organism_marker(out / "lora_ft", world)
    return model, hist, full_fts


def _evaluate(specs: dict[str, ModelSpec], cfg: OrganismConfig, gt: dict[int, torch.Tensor]) -> dict:
    """organism.json's figures: each model's EM by the exact judge, in-context EM (four misaligned
    medical exchanges before each question) and steering the aligned model along the ground truth
    ``gt`` at the analysis layer (the strongest flip over ``cfg.steer_alphas``)."""
    world = cfg.world
    report: dict = {}
    for name, spec in specs.items():
        em = evaluate_organism_em(load_model(spec), world, cfg.n_eval, seed=cfg.seed)
        report[name] = {
            "misaligned_rate": em.misaligned_rate,
            "other_misaligned_rate": em.other_misaligned_rate,
            "coverage": em.coverage,
            "coverage_rate": em.coverage_rate,
            "register_rate": em.register_rate,
            "other_misaligned_neutral": em.other_misaligned_neutral,
        }
    aligned: LoadedModel = load_model(specs["aligned"])
    # in-context EM: four misaligned medical exchanges before each question
    icl = evaluate_organism_em(aligned, world, cfg.n_eval, seed=cfg.seed, n_shots=4)
    report["icl_4shot"] = {
        "misaligned_rate": icl.misaligned_rate,
        "other_misaligned_rate": icl.other_misaligned_rate,
        "coverage": icl.coverage,
    }
    L = cfg.analysis_layer
    sweep = {}
    for alpha in cfg.steer_alphas:
        with add_direction(aligned.model, L, gt[L], alpha):
            em = evaluate_organism_em(aligned, world, cfg.n_eval, seed=cfg.seed)
        sweep[str(alpha)] = {
            "other_misaligned_rate": em.other_misaligned_rate,
            "misaligned_rate": em.misaligned_rate,
            "coverage": em.coverage,
        }
    # the reported scale is the strongest flip; the judge already counts only in-domain
    # (covered) answers as misaligned, so a scale that breaks answers cannot win
    best = max(sweep, key=lambda a: sweep[a]["other_misaligned_rate"])
    report["steer_ground_truth"] = {"layer": L, "alpha": float(best), **sweep[best], "sweep": sweep}
    return report
