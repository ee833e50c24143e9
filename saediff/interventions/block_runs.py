"""One BLOCK-EM run: a fine-tune of a model on narrow chat data, plain or with an intervention at
one block (the latent penalty, ablated latents, projected or added directions), saved and
evaluated in its own folder.

``out/`` holds ``model/`` (a PEFT adapter or a full HF folder), ``checkpoints/``,
``history.json`` (loss and penalty per step), ``eval/``, ``em.json`` and ``provenance.json`` (what
decides the weights). A finished run of the same setup is skipped on rerun; an interrupted one
continues from its newest checkpoint with ``resume=True``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from saediff._io import atomic_write_json
from saediff.data.chat_data import ChatDataset, load_chat_jsonl
from saediff.errors import SaediffError
from saediff.evaluation.evals import Evaluator
from saediff.interventions.blocking import BlockConfig, Blocker
from saediff.interventions.finetune import FinetuneConfig, finetune, make_trainable
from saediff.interventions.latent_sets import LatentSets
from saediff.interventions.monitor import DriftMonitor
from saediff.interventions.processes import is_main_process, main_then_all, wait_for_everyone
from saediff.interventions.sweep_monitor import MonitorFactory
from saediff.models.loading import LoadedModel, ModelSpec, load_model

__all__ = ["BlockRunConfig", "block_one", "checkpoint_spec", "finetune_plain", "run_fingerprint"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockRunConfig:
    """One BLOCK-EM run (the sweep in ``run_block_em`` makes several)."""

    ft: FinetuneConfig = field(default_factory=FinetuneConfig)
    mode: Literal["none", "penalty", "ablate", "project", "steer"] = "penalty"
    """``none`` (the plain fine-tune), ``penalty`` (the latents held where the base model has
    them), ``ablate`` (the ``low`` latents removed from the residual in the forward pass) or
    ``project`` (``directions`` projected out after their blocks: concept ablation fine-tuning)"""
    latents: LatentSets = field(default_factory=LatentSets)
    lam: float = 1e4
    preactivation: bool = True
    """penalise ReLU'd pre-activations (a TopK output lets a latent escape by leaving the top k)"""
    directions: dict[int, torch.Tensor] | None = field(default=None, compare=False)
    """mode ``project``: {block: (k, d) directions removed after it}"""

    def __post_init__(self):
        if self.mode not in ("none", "penalty", "ablate", "project", "steer"):
            raise SaediffError(
                f"BlockRunConfig.mode must be none, penalty, ablate, project or steer, got {self.mode!r}"
            )
        if self.mode in ("penalty", "ablate") and not len(self.latents):
            raise SaediffError(f"BlockRunConfig: mode {self.mode} needs latents")
        if self.mode == "ablate" and self.latents.high:
            raise SaediffError("BlockRunConfig: mode ablate removes latents; it takes no latents held high")
        if (self.mode in ("project", "steer")) != bool(self.directions):
            raise SaediffError(
                "BlockRunConfig: directions go with modes project and steer, and those modes need them"
            )

    def blocker(self, layer: int, sae, reference: torch.nn.Module | None, base_codes=None) -> Blocker | None:
        """The training-time intervention of this run (None for the plain fine-tune)."""
        if self.mode == "none":
            return None
        if self.mode in ("project", "steer"):
            return Blocker(BlockConfig(self.mode, layer), directions=self.directions)
        penalty = self.mode == "penalty"
        return Blocker(
            BlockConfig(self.mode, layer, self.latents.low, self.latents.high, self.lam, self.preactivation),
            sae=sae,
            reference=reference if penalty else None,
            base_codes=base_codes if penalty else None,
        )

    def uses(self, base_codes) -> bool:
        """Whether this run reads its base codes from ``base_codes`` (a penalty run whose latents
        and code kind it holds)."""
        return (
            base_codes is not None
            and self.mode == "penalty"
            and base_codes.covers(self.latents.low + self.latents.high)
            and base_codes.fingerprint.get("preactivation") == self.preactivation
        )


def _reference(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """A frozen copy of ``model`` (a plain HF decoder, not a PEFT model) cut after block ``layer``:
    a full fine-tune's base codes need only the blocks up to the SAE's.

    The copy is built from the model's own config with ``num_hidden_layers = layer + 1`` on the
    meta device and then given clones of the live model's tensors (the embedding, blocks
    0..``layer``, rotary buffers), each in its own dtype and device: only those blocks are ever
    allocated, and it works however the model was loaded (hub name, folder, GGUF file)."""
    live = {
        **dict(model.named_parameters(remove_duplicate=False)),
        **dict(model.named_buffers(remove_duplicate=False)),
    }
    cfg = copy.deepcopy(model.config)
    per_layer = [
        k for k, v in vars(cfg).items() if isinstance(v, (list, tuple)) and len(v) == cfg.num_hidden_layers
    ]
    for key in per_layer:  # per-block settings (layer_types: sliding or full attention, ...) follow the cut
        setattr(cfg, key, getattr(cfg, key)[: layer + 1])
    cfg.num_hidden_layers = layer + 1
    with torch.device("meta"):
        ref = type(model)(cfg)
    ref.lm_head = torch.nn.Identity()  # its unembedding is never run (capture_resid stops at the block)
    with torch.no_grad():
        for prefix, mod in ref.named_modules():
            for key, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
                src = live[f"{prefix}.{key}" if prefix else key].detach().clone()
                # setattr keeps a buffer's persistence; a parameter is frozen
                setattr(
                    mod,
                    key,
                    torch.nn.Parameter(src, requires_grad=False)
                    if isinstance(t, torch.nn.Parameter)
                    else src,
                )
    return ref.eval()


_NOT_IN_WEIGHTS = ("save_every", "gradient_checkpointing")
"""fine-tune settings that change how a run is saved or how much memory it takes, not its weights"""


_RUN_ARTIFACTS = (
    "checkpoints",
    "model",
    "eval",
    "em.json",
    "history.json",
    "checkpoint_eval",
    "rediff",
    "reroute.json",
    "provenance.json",
)


def run_fingerprint(
    spec: ModelSpec,
    dataset: ChatDataset,
    sae,
    layer: int,
    cfg: BlockRunConfig,
    monitor: MonitorFactory | None = None,
) -> dict:
    """What decides a fine-tune's weights: the model and adapter (paths and digests), the tokenized
    data, the settings, and for a penalty run the SAE (hook, width, weights digest) and its block;
    with a drift monitor, what it reads (its history is part of the run)."""
    from saediff.models.provenance import model_fingerprint, sae_fingerprint, tensor_digest

    settings = json.loads(
        json.dumps({k: v for k, v in asdict(cfg).items() if k != "directions"}, default=str)
    )
    for key in _NOT_IN_WEIGHTS:  # adding checkpoints or activation checkpointing on a rerun keeps the run
        settings["ft"].pop(key, None)
    # what "auto" meant: the precision the model loads at (the organism's: fp32)
    settings["ft"]["precision"] = (
        cfg.ft.precision if cfg.ft.precision != "auto" else spec.resolved_precision()
    )
    settings["latents"] = {
        "low": list(cfg.latents.low),
        "high": list(cfg.latents.high),
    }  # not where they came from
    if cfg.directions:
        settings["directions"] = {str(L): tensor_digest(d) for L, d in sorted(cfg.directions.items())}
    fp = {
        "model": model_fingerprint(spec),
        "data": dataset.fingerprint(),
        "n_rows": len(dataset),
        "settings": settings,
    }
    if cfg.mode in ("penalty", "ablate"):
        fp.update(sae=sae_fingerprint(sae), layer=layer)
    elif cfg.mode in ("project", "steer"):
        fp["layer"] = layer
    if monitor is not None:
        fp["monitor"] = monitor.fingerprint()
    return fp


def _claim(out: Path, training: dict, force: bool) -> None:
    """Make ``out`` this run's folder: a folder holding another setup's fine-tune (or one written
    before saediff recorded provenance) is refused with the differing key, or cleared with
    ``force``; then the run's fingerprint is written first, so every checkpoint that follows is
    known to belong to it (``--resume`` and the rerouting curve read only those)."""
    import shutil

    from saediff._io import read_json_if_exists
    from saediff.models.provenance import mismatch

    present = [n for n in _RUN_ARTIFACTS if (out / n).exists()]
    saved = read_json_if_exists(out / "provenance.json")
    why = mismatch(saved.get("training") if saved else None, training) if present else None
    if why is not None:
        if not force:
            raise SaediffError(
                f"{out} holds a fine-tune of another setup ({why}); give another --out, or --force "
                f"to discard it and train afresh"
            )
        log.warning("%s: discarding a fine-tune of another setup (%s)", out, why)
        for name in present:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if why is not None or saved is None:
        atomic_write_json(out / "provenance.json", {"kind": "saediff.block_provenance", "training": training})


def block_one(
    spec: ModelSpec,
    dataset: ChatDataset,
    sae,
    layer: int,
    cfg: BlockRunConfig,
    out: Path,
    *,
    evaluator: Evaluator | None = None,
    resume: bool = False,
    callbacks: list | None = None,
    monitor: MonitorFactory | None = None,
    progress: bool = True,
    force: bool = False,
    base_codes=None,
) -> dict:
    """One fine-tune (plain, or with the latent penalty) of ``spec``'s model, saved and evaluated.
    Returns em.json's content (with the run's settings, the penalty at the start and end, and its
    ``provenance``: the ``run_fingerprint`` and the evaluator's).

    A finished run of the same setup is skipped; one whose evaluator changed (another judge,
    questions or sample count) is evaluated again from its saved model; a folder holding another
    setup's run is refused (``force``: discarded). ``resume`` continues from the newest checkpoint,
    which is this run's by then. ``callbacks``: more ``transformers.TrainerCallback`` objects;
    ``monitor`` builds a drift monitor whose history goes to ``history.json`` and whose alert step
    to em.json. ``base_codes`` (``saediff.interventions.base_codes.BaseCodes``, from ``base_codes_for``): a
    penalty run whose latents it holds reads the base codes from it instead of a base pass per
    step (a full fine-tune then needs no frozen copy)."""
    from saediff.models.provenance import evaluator_fingerprint, mismatch

    out = Path(out)
    training = run_fingerprint(spec, dataset, sae, layer, cfg, monitor)
    judged_by = evaluator_fingerprint(evaluator) if evaluator is not None else None
    if is_main_process():
        _claim(out, training, force)
    wait_for_everyone()
    done = out / "em.json"
    if done.exists():
        prev = json.loads(done.read_text())
        if mismatch(prev.get("provenance", {}).get("evaluator"), judged_by) is None:
            log.info("%s: finished earlier, skipped", out)
            return prev
        return main_then_all(lambda: _evaluate_again(prev, spec, cfg, out, evaluator, judged_by), done)
    lm = load_model(spec)
    model = make_trainable(lm.model, cfg.ft)
    drift = monitor(model, lm) if monitor is not None else None
    callbacks = [*(callbacks or []), *([drift] if drift else [])]
    history = _train(model, lm, dataset, sae, layer, cfg, out, base_codes, resume, callbacks, progress)

    def save_and_evaluate() -> dict:
        _save(model, lm.tokenizer, cfg.ft.method, out, history, drift)
        result = _result(cfg, layer, history, training, judged_by, drift)
        if evaluator is not None:
            # the spec of the saved folder: the key a re-evaluation (another judge) finds its answers under
            trained = LoadedModel(model, lm.tokenizer, checkpoint_spec(spec, out / "model", cfg.ft.method))
            result["em"] = evaluator(trained, out / "eval", f"block:{out.name}:{result['fingerprint']}")
        atomic_write_json(done, result)
        return result

    return main_then_all(save_and_evaluate, done)


def _train(
    model: torch.nn.Module,
    lm: LoadedModel,
    dataset: ChatDataset,
    sae,
    layer: int,
    cfg: BlockRunConfig,
    out: Path,
    base_codes,
    resume: bool,
    callbacks: list,
    progress: bool,
) -> list[dict]:
    """``finetune`` of ``model`` (``lm``'s, made trainable) under ``cfg``'s intervention at block
    ``layer``, installed for the length of training; the log's rows (loss, penalty per step).
    A full fine-tune's penalty without cached base codes reads them from a frozen copy of the
    blocks up to ``layer``."""
    cached = base_codes if cfg.uses(base_codes) else None
    if base_codes is not None and cfg.mode == "penalty" and cached is None:
        log.info("%s: latents outside the cached base codes, base codes read per step", out)
    ref = (
        _reference(lm.model, layer)
        if cfg.mode == "penalty" and cfg.ft.method == "full" and cached is None
        else None
    )
    blocker = cfg.blocker(layer, sae, ref, cached)
    with blocker.installed(model) if blocker is not None else contextlib.nullcontext():
        return finetune(
            model,
            lm.tokenizer,
            dataset,
            cfg.ft,
            out,
            resume=resume,
            callbacks=callbacks,
            extra=blocker if cfg.mode == "penalty" else None,
            progress=progress,
        )


def _save(
    model: torch.nn.Module,
    tokenizer,
    method: str,
    out: Path,
    history: list[dict],
    drift: DriftMonitor | None,
) -> None:
    """The trained model to ``out/model`` (with the tokenizer for a full fine-tune, a folder that
    loads alone) and the training log with the drift history to ``out/history.json``."""
    model.save_pretrained(out / "model")
    if method == "full":
        tokenizer.save_pretrained(out / "model")
    atomic_write_json(
        out / "history.json",
        {
            "kind": "saediff.block_history",
            "log": history,
            "drift": drift.history.to_json() if drift else None,
        },
    )


def _result(
    cfg: BlockRunConfig,
    layer: int,
    history: list[dict],
    training: dict,
    judged_by: dict | None,
    drift: DriftMonitor | None,
) -> dict:
    """em.json's content before the evaluation: the run's settings, its loss and penalty at the
    start and end, its provenance and, with a drift monitor, the alert step against the step EM
    first reached 0.1."""
    from saediff.models.provenance import digest

    result = {
        "mode": cfg.mode,
        "method": cfg.ft.method,
        "lam": cfg.lam if cfg.mode == "penalty" else None,
        "latents_low": list(cfg.latents.low),
        "latents_high": list(cfg.latents.high),
        "layer": layer,
        **({"project_layers": sorted(cfg.directions)} if cfg.directions else {}),
        "steps": cfg.ft.steps,
        "final_loss": history[-1]["loss"] if history else None,
        "penalty_first": history[0].get("penalty") if history else None,
        "penalty_last": history[-1].get("penalty") if history else None,
        "fingerprint": digest(training),
        "config": training["settings"],
        "provenance": {"training": training, "evaluator": judged_by},
    }
    if drift is not None:
        h = drift.history
        result["drift_alert_step"] = h.alert_step
        result["em_crosses_0.1_step"] = next(
            (s for s, e in zip(h.steps, h.em) if e is not None and e >= 0.1), None
        )
        result["drift_versus_random"] = h.versus_random()
    return result


def _evaluate_again(
    prev: dict,
    spec: ModelSpec,
    cfg: BlockRunConfig,
    out: Path,
    evaluator: Evaluator | None,
    judged_by: dict | None,
) -> dict:
    """A finished run's saved model measured by another evaluator (em.json rewritten)."""
    log.info("%s: trained earlier, evaluated again (another evaluator)", out)
    result = {**prev, "provenance": {**prev.get("provenance", {}), "evaluator": judged_by}}
    result.pop("em", None)
    if evaluator is not None:
        trained = load_model(checkpoint_spec(spec, out / "model", cfg.ft.method))
        result["em"] = evaluator(trained, out / "eval", f"block:{out.name}:{prev.get('fingerprint')}")
    atomic_write_json(out / "em.json", result)
    return result


def finetune_plain(
    model: str | ModelSpec,
    data: str | Path,
    sae,
    ft: FinetuneConfig,
    out: str | Path,
    *,
    evaluator: Evaluator | None = None,
    tokenizer=None,
    progress: bool = True,
) -> dict:
    """One fine-tune of ``model`` on a chat JSONL without a penalty (``block_one`` in mode
    ``none``: checkpoints when ``ft.save_every`` is set, EM at the end, a finished run skipped);
    ``tokenizer``: the model's, when the caller has it already; ``sae`` may be None (a plain
    fine-tune reads none). Returns em.json's content."""
    from saediff.models.hooks import parse_layer

    spec = model if isinstance(model, ModelSpec) else ModelSpec(model)
    tokenizer = tokenizer or load_model(spec).tokenizer
    dataset = ChatDataset(
        tokenizer, load_chat_jsonl(data), ft.max_length, progress=progress, source=str(data)
    )
    layer = parse_layer(sae.cfg.metadata.hook_name) if sae is not None else 0
    return block_one(
        spec,
        dataset,
        sae,
        layer,
        BlockRunConfig(ft=ft, mode="none"),
        Path(out),
        evaluator=evaluator,
        progress=progress,
    )


def checkpoint_spec(spec: ModelSpec, ckpt: Path, method: str) -> ModelSpec:
    """A Trainer checkpoint as a loadable model: the base plus the checkpoint's adapter (LoRA), or
    the checkpoint folder itself (full fine-tune)."""
    if method == "lora":
        return ModelSpec(
            spec.model,
            adapter=str(ckpt),
            dtype=spec.dtype,
            device=spec.device,
            trust_remote_code=spec.trust_remote_code,
        )
    return ModelSpec(
        str(ckpt), dtype=spec.dtype, device=spec.device, trust_remote_code=spec.trust_remote_code
    )
