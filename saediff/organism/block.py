"""BLOCK-EM runs on the organism: the narrow medical fine-tune with latents held down, its
controls (plain fine-tune, random latents, aligned-data control), the drift monitor, and the
rerouting re-diff.

    saediff block --organism runs/demo/organism --diff-run runs/demo/diff --out runs/block
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch

from saediff._io import atomic_write_json
from saediff.activations import tokenize_prompts
from saediff.blocking import BlockConfig, Blocker
from saediff.organism.evaluator import evaluate_organism_em
from saediff.finetune import TrainConfig, train_lm
from saediff.hooks import parse_layer
from saediff.models import LoadedModel, generate, load_model
from saediff.monitor import DriftMonitor
from saediff.organism.build import load_ground_truth
from saediff.organism.prompts import em_questions
from saediff.organism.recipes import OrganismConfig, _medical_chats, read_organism_world, save_model_folder
from saediff.organism.world import CHAT, World
from saediff.errors import MissingFileError, SaediffError

__all__ = ["run_block", "run_reroute", "choose_latents", "organism_config", "generic_inputs", "block_organism",
           "organism_monitor"]


def organism_config(organism_dir: Path, world: World) -> OrganismConfig:
    """The config an organism folder was built with (from its organism.json)."""
    saved = json.loads((organism_dir / "organism.json").read_text())["config"]
    fields = OrganismConfig.__dataclass_fields__
    return OrganismConfig(**{k: v for k, v in saved.items() if k in fields and k != "world"}, world=world)


def generic_inputs(organism_dir: str | Path, full: bool, samples: int = 50, seed: int = 0) -> dict:
    """What ``saediff block --organism DIR`` fills in for the generic command: the aligned model,
    the misaligned medical chats (``DIR/data/medical_misaligned.jsonl``, written if missing), its
    controls (aligned, held-out aligned and, in worlds with a register slot, the formal-register
    aligned chats that neither persona favours: the drift monitor's other-distribution false-alarm
    check), the SAE, the exact judge and the organism's fine-tune recipe (full: lr 2e-4; LoRA:
    rank 1 on ``down_proj`` of its LoRA layer, lr 2e-3; 300 steps of 32)."""
    from saediff.organism.evaluator import OrganismEvaluator
    from saediff.organism.recipes import narrow_finetune_config, write_chat_data

    organism_dir = Path(organism_dir)
    world = read_organism_world(organism_dir / "aligned")
    if world is None:
        raise MissingFileError(f"{organism_dir}/aligned is not a saediff organism folder")
    ocfg = organism_config(organism_dir, world)
    data = write_chat_data(organism_dir, ocfg)
    return {"model": str(organism_dir / "aligned"), "data": data["medical_misaligned"],
            "control_data": data["medical_aligned"], "heldout_control_data": data["medical_aligned_heldout"],
            "benign_control_data": data.get("medical_aligned_formal"),
            "ft": narrow_finetune_config(ocfg, "full" if full else "lora"), "sae": str(organism_dir / "sae"),
            "evaluator": OrganismEvaluator(world, samples, seed),
            "monitor": lambda layer: organism_monitor(organism_dir, world, layer, seed=seed)}


def block_organism(organism_dir: str | Path, out: str | Path, latents, *, full: bool = True,
                   lams: tuple[float, ...] = (1e4,), controls: bool = True, steps: int | None = None, seed: int = 0,
                   samples: int = 50, reroute: bool = False, reblock: bool = False) -> dict:
    """``saediff block --organism DIR [--full]``: the generic BLOCK-EM sweep (``run_block_em``)
    with the organism's inputs, its aligned-data control (which calibrates the drift monitor)
    and its exact judge. ``latents``: a ``saediff.blockem.LatentSets``. ``reroute``: each blocked
    run is trained 3x longer too and re-diffed on the organism's questions (``reblock``: then the
    latents that rose outside the blocked sets are held as well)."""
    from dataclasses import replace

    from saediff.blockem import run_block_em
    from saediff.saes import load_sae

    rec = generic_inputs(organism_dir, full, samples, seed)
    sae = load_sae(rec["sae"])
    layer = parse_layer(sae.cfg.metadata.hook_name)
    ft = replace(rec["ft"], steps=steps or rec["ft"].steps)
    rediff = None
    if reroute:
        from saediff.blockem import rediff_against
        from saediff.organism.demo import diff_inputs

        rediff = rediff_against(rec["model"], rec["sae"], seed, **diff_inputs(rec["model"], "organism:50", seed=seed))
    return run_block_em(rec["model"], rec["data"], sae, out, latents, ft=ft, lams=lams, controls=controls,
                        evaluator=rec["evaluator"], seed=seed, sae_path=rec["sae"], monitor=rec["monitor"](layer),
                        control_data=rec["control_data"], heldout_control_data=rec["heldout_control_data"],
                        benign_control_data=rec["benign_control_data"],
                        reroute_factor=3 if reroute else None, rediff=rediff,
                        reblock=reblock, progress=False)


def organism_monitor(organism_dir: Path, world: World, layer: int, every: int = 10, seed: int = 0):
    """A drift-monitor factory for organism fine-tunes: 20 held-out questions per non-medical
    domain, the ground truth at ``layer``, and the exact other-domain EM rate (10 answers per
    domain, 50 off-domain) at every check, every 10 steps (the demo's time budget) and after steps 1,
    2, 4 and 8 (at lr 2e-4 off-domain EM can pass 0.1 within the first 10 steps)."""
    from saediff.blockem import MonitorFactory

    qs = [p for p in em_questions(world, 20, seed=seed + 11) if p.domain != "medical"]
    gt = load_ground_truth(Path(organism_dir) / "ground_truth.safetensors")[layer]
    return MonitorFactory(qs, gt[None], layer, every=every, max_new_tokens=world.answer_len + 1, seed=seed,
                          early=True, em_fn=lambda lm: evaluate_organism_em(lm, world, 10, seed=seed).other_misaligned_rate)


def choose_latents(sae, diff_run: str | Path | None, latents: list[int] | None, n_latents: int, n_high: int,
                   random_latents: bool, seed: int) -> tuple[list[int], list[int]]:
    """(latents held low, latents held high): explicit ones, or the top ``n_latents`` and bottom
    ``n_high`` of the diff run's ranking; with ``random_latents`` as many random latents instead."""
    high: list[int] = []
    if latents is None:
        if diff_run is None:
            raise SaediffError("run_block: give latents or a diff run to take the top latents from")
        from saediff.diff import LatentDiff
        from saediff.pipeline import read_run

        ranking = read_run(diff_run)["steps"]["diff"]["ranking"]
        table = LatentDiff.from_json(json.loads((Path(diff_run) / "diff.json").read_text()))
        latents = table.top(n_latents, ranking)
        high = table.bottom(n_high, "delta") if n_high else []
    latents = list(latents)
    if random_latents:
        g = torch.Generator().manual_seed(seed + 99)
        pool = [i for i in torch.randperm(sae.cfg.d_sae, generator=g).tolist() if i not in latents]
        latents, high = pool[: len(latents)], pool[len(latents) : len(latents) + len(high)]
    return latents, high


def _trainable(base: LoadedModel, kind: str, ocfg: OrganismConfig, layer: int, up_to_layer: bool, seed: int):
    """A copy of the aligned model to fine-tune with the organism's recipe (full, or rank-1 LoRA on
    its LoRA layer), and its lr; ``up_to_layer`` freezes the blocks after ``layer``."""
    from saediff.finetune import make_trainable
    from saediff.organism.recipes import narrow_finetune_config

    ft = dataclasses.replace(narrow_finetune_config(ocfg, kind), seed=seed + 3,
                             freeze_after_block=layer if up_to_layer else None)
    return make_trainable(copy.deepcopy(base.model), ft), ft.lr


def _monitor(base: LoadedModel, trained: LoadedModel, world: World, organism_dir: Path, layer: int, sae,
             latents: list[int], every: int, seed: int) -> DriftMonitor:
    """Drift monitor on held-out off-domain chats, teacher-forced with the aligned model's answers,
    probing the ground-truth direction; behavioural EM (20 answers per domain) alongside."""
    qs = [p for p in em_questions(world, 20, seed=seed + 11) if p.domain != "medical"]
    answers = generate(base, [p.messages for p in qs], max_new_tokens=world.answer_len + 1, seed=seed, progress=False)
    toks = tokenize_prompts(base, [dataclasses.replace(p, response=a.strip()) for p, a in zip(qs, answers)])
    gt = load_ground_truth(organism_dir / "ground_truth.safetensors")[layer]
    return DriftMonitor(trained.model, toks.input_ids, toks.select("response"), layer, gt[None], every=every,
                        sae=sae, latents=latents,
                        em_fn=lambda: evaluate_organism_em(trained, world, 20, seed=seed).other_misaligned_rate)


def run_block(organism_dir: str | Path, out: str | Path, *, mode: str = "penalty", lam: float = 1000.0,
              diff_run: str | Path | None = None, latents: list[int] | None = None, n_latents: int = 3,
              n_high: int = 0, random_latents: bool = False, kind: str = "full", steps: int | None = None,
              train_up_to_block_layer: bool = False, project_layers: list[int] | None = None,
              project_direction: str = "ground_truth", monitor_every: int = 25, n_eval: int = 50, seed: int = 0,
              persona: int = 1) -> dict:
    """A BLOCK-EM fine-tune of the organism's aligned model on the misaligned medical data.

    ``mode="none"`` is the plain fine-tune (same data, steps, seed); ``persona=0`` trains on the
    aligned medical answers instead (the control fine-tune). ``n_high`` also holds up the latents
    that fell most in the diff. ``train_up_to_block_layer`` freezes all but decoder layers
    ``<= layer`` (the BLOCK-EM paper's fix for rerouting; embeddings stay frozen, they are tied to
    the unembedding). ``mode="project"`` removes ``project_direction`` (``ground_truth``,
    ``model_diff`` from ``diff_run``, or ``latents``: the chosen latents' decoder rows) after each
    block in ``project_layers`` (default: the SAE's); with ``random_latents``, random directions
    of the same count. Writes the model (HF folder or PEFT adapter), ``history.json`` (loss,
    penalty, drift monitor) and ``em.json``; returns em.json's content.
    """
    from saediff.saes import load_sae

    organism_dir, out = Path(organism_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = read_organism_world(organism_dir / "aligned")
    if world is None:
        raise MissingFileError(f"{organism_dir}/aligned is not a saediff organism folder")
    ocfg = organism_config(organism_dir, world)
    base = load_model(str(organism_dir / "aligned"))
    sae = load_sae(organism_dir / "sae")
    layer = parse_layer(sae.cfg.metadata.hook_name)
    if mode == "project" and latents is not None and project_direction != "latents":
        raise SaediffError(f"run_block: latents given but project_direction is {project_direction!r}; use 'latents'")
    by_latents = mode in ("penalty", "ablate") or (mode == "project" and project_direction == "latents")
    low, high = choose_latents(sae, diff_run, latents, n_latents, n_high, random_latents, seed) if by_latents else ([], [])
    layers = sorted(project_layers or [layer])
    directions = None
    if mode == "project":
        directions = _project_directions(organism_dir, sae, layer, layers, project_direction, low, diff_run,
                                         random_latents, seed)
    bcfg = BlockConfig(mode=mode, layer=layer, latents_low=tuple(low),
                       latents_high=tuple(high) if mode == "penalty" else (), lam=lam)
    blocker = Blocker(bcfg, sae=sae if mode in ("penalty", "ablate") else None, directions=directions)

    n_steps = steps or ocfg.ft_steps
    data = _medical_chats(ocfg, "medical_misaligned" if persona else "medical_aligned", n_steps)
    if mode == "penalty":
        blocker.precompute_base(base.model, data.input_ids)
    torch.manual_seed(seed + 3)
    model, lr = _trainable(base, kind, ocfg, layer, train_up_to_block_layer, seed)
    trained = dataclasses.replace(base, model=model, _bridge=None)
    monitor = _monitor(base, trained, world, organism_dir, layer, sae, low, monitor_every, seed)
    monitor.check(-1)
    tc = TrainConfig(steps=n_steps, batch_size=ocfg.ft_batch, lr=lr, seed=ocfg.seed + 2)
    with blocker.installed(model):
        hist = train_lm(model, data, tc, desc=f"block {mode}", callback=monitor, extra_loss=blocker.extra_loss)
    em = evaluate_organism_em(trained, world, n_eval, seed=seed)
    if kind == "lora":
        model.save_pretrained(out / "model")
    else:
        save_model_folder(model, out / "model", CHAT, world)
    drift = monitor.history
    atomic_write_json(out / "history.json", {"loss": hist.loss, "penalty": hist.extra, "drift": drift.to_json()})
    result = {"mode": mode, "kind": kind, "lam": lam, "latents": low, "latents_high": high,
              "random_latents": random_latents, "train_up_to_block_layer": train_up_to_block_layer,
              **({"project_layers": layers, "project_direction": project_direction} if mode == "project" else {}),
              "steps": n_steps, "layer": layer, "other_misaligned_rate": em.other_misaligned_rate,
              "misaligned_rate": em.misaligned_rate, "coverage": em.coverage, "drift_alert_step": drift.alert_step,
              "em_crosses_0.1_step": next((s for s, e in zip(drift.steps, drift.em) if e is not None and e >= 0.1), None)}
    atomic_write_json(out / "em.json", result)
    return result


def _project_directions(organism_dir: Path, sae, layer: int, layers: list[int], source: str, low: list[int],
                        diff_run: str | Path | None, random: bool, seed: int) -> dict[int, torch.Tensor]:
    """{block: (k, d) directions removed after it} for ``mode="project"``."""
    if source == "latents":
        if layers != [layer]:
            raise SaediffError(f"run_block: latent directions live at the SAE's block {layer}, not {layers}")
        return {layer: torch.stack([sae.W_dec[i].detach() for i in low])}  # random latents already chosen
    if source == "model_diff":
        if diff_run is None:
            raise SaediffError("run_block: project_direction model_diff needs a diff run")
        from saediff.export import load_directions

        found = load_directions(Path(diff_run) / "directions")
        missing = [f"mean_diff_models_L{L}" for L in layers if f"mean_diff_models_L{L}" not in found]
        if missing:
            raise SaediffError(f"run_block: {diff_run}/directions has no {', '.join(missing)}")
        dirs = {L: found[f"mean_diff_models_L{L}"].vector[None] for L in layers}
    elif source == "ground_truth":
        gt = load_ground_truth(organism_dir / "ground_truth.safetensors")
        if any(L not in gt for L in layers):
            raise SaediffError(f"run_block: project_layers {layers} outside the model's blocks 0-{max(gt)}")
        dirs = {L: gt[L][None] for L in layers}
    else:
        raise SaediffError(f"run_block: project_direction must be ground_truth, model_diff or latents, got {source!r}")
    if random:  # the control: as many random directions per block
        g = torch.Generator().manual_seed(seed + 99)
        dirs = {L: torch.randn(v.shape, generator=g) for L, v in dirs.items()}
    return dirs


def run_reroute(organism_dir: str | Path, block_dir: str | Path, *, top_n: int = 10, prompts: str = "organism:50") -> dict:
    """Re-diff a blocked full fine-tune against the aligned model: how many of the top shifted
    latents lie outside the blocked set (misalignment rerouted through other latents)?"""
    from saediff.organism.demo import diff_inputs
    from saediff.pipeline import run_diff

    organism_dir, block_dir = Path(organism_dir), Path(block_dir)
    em = json.loads((block_dir / "em.json").read_text())
    if em.get("kind", em.get("method")) != "full":
        raise SaediffError("run_reroute: re-diffing needs a full fine-tune folder (kind=full)")
    summary = run_diff(str(organism_dir / "aligned"), str(block_dir / "model"), str(organism_dir / "sae"),
                       block_dir / "rediff", top_n=top_n, **diff_inputs(organism_dir / "aligned", prompts))
    blocked = set(em.get("latents", em.get("latents_low", []))) | set(em.get("latents_high", []))
    outside = [i for i in summary["top_latents"] if i not in blocked]
    result = {"blocked": sorted(blocked), "top_after": summary["top_latents"], "n_outside": len(outside),
              "new_latents": outside}
    atomic_write_json(block_dir / "reroute.json", result)
    return result
