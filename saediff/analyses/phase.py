"""Phase transitions of a LoRA fine-tune: when does the adapter's B vector rotate, and when does
EM appear?

For each checkpoint of a LoRA run (``checkpoint-N`` folders of PEFT adapters, the layout the
``Trainer`` and the ModelOrganismsForEM checkpoint repositories use) and one adapted module
(default: the ``down_proj`` of the first adapted layer), the residual-space direction the adapter
writes: ``B[:, 0]`` for rank 1, the top left singular vector of ``B @ A`` (sign matched to the
last checkpoint's) above. Per checkpoint: the *local cosine* with the previous checkpoint's
direction (1: no rotation), the cosine with each persona candidate at the same hook, the norms of
A and B, and (when an evaluator is given) EM. The rotation step is the checkpoint with the lowest
local cosine; the EM step the first checkpoint whose EM reaches half of the largest EM seen (and at
least ``min_em``).

    saediff phase runs/block/plain --base Qwen/Qwen2.5-7B-Instruct --directions RUN/directions \\
        --judge-url http://localhost:8000/v1 --judge-model gpt-4o
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float

from saediff.errors import MissingFileError, SaediffError
from saediff.models.hooks import resid_post

__all__ = [
    "CheckpointVector",
    "PhaseResult",
    "adapter_checkpoints",
    "checkpoint_vectors",
    "local_cosines",
    "phase_analysis",
    "run_phase",
]

log = logging.getLogger(__name__)


def adapter_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of each ``checkpoint-N`` holding a PEFT adapter, oldest first, under
    ``folder`` or its ``checkpoints/`` sub-folder (a saediff fine-tune's run folder)."""
    from saediff.interventions.finetune import checkpoints

    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"checkpoint folder not found: {folder}")
    found = checkpoints(folder) or checkpoints(folder / "checkpoints")
    found = [(s, p) for s, p in found if (p / "adapter_model.safetensors").exists()]
    if len(found) < 2:
        raise SaediffError(
            f"{folder}: needs at least two checkpoint-N folders with adapter_model.safetensors "
            f"(found {len(found)}); fine-tune with --save-every N"
        )
    return found


@dataclass(frozen=True)
class CheckpointVector:
    step: int
    path: Path
    module: str
    layer: int
    direction: Float[torch.Tensor, " d_out"]
    """unit residual-space direction the adapter writes"""
    norm_A: float
    norm_B: float


def _direction(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    if A.shape[0] == 1:
        v = B[:, 0]
    else:
        U, _, _ = torch.linalg.svd((B @ A).double(), full_matrices=False)
        v = U[:, 0].float()
    return v / v.norm().clamp_min(1e-12)


def checkpoint_vectors(
    ckpts: list[tuple[int, Path]], module: str | None = None, kind: str = "down_proj"
) -> list[CheckpointVector]:
    """The adapter direction of one module at every checkpoint (``module``: its full name, e.g.
    ``model.layers.21.mlp.down_proj``; default the ``kind`` module of the first adapted layer)."""
    from saediff.models.lora import read_adapter

    out, rank = [], 1
    for step, path in ckpts:
        adapter = read_adapter(path)
        if module is None:
            by = adapter.by_kind(kind)
            if not by:
                raise SaediffError(
                    f"{path}: no {kind} module in the adapter (modules: {', '.join(adapter.modules)})"
                )
            module = by[min(by)].name
        m = adapter.modules.get(module)
        if m is None:
            raise SaediffError(
                f"{path}: module {module} not in the adapter (modules: {', '.join(adapter.modules)})"
            )
        rank = m.rank
        out.append(
            CheckpointVector(
                step,
                path,
                module,
                m.layer if m.layer is not None else -1,
                _direction(m.A, m.B),
                float(m.A.norm()),
                float(m.B.norm()),
            )
        )
    # higher ranks: a singular vector's sign is arbitrary; match each to the last checkpoint's
    if rank > 1:
        ref = out[-1].direction
        out = [
            v
            if float(v.direction @ ref) >= 0
            else CheckpointVector(v.step, v.path, v.module, v.layer, -v.direction, v.norm_A, v.norm_B)
            for v in out
        ]
    return out


def local_cosines(directions_SD: Float[torch.Tensor, "s d"]) -> list[float]:
    """Cosine of each direction with the one before it (s - 1 values)."""
    if directions_SD.shape[0] < 2:
        raise SaediffError("local_cosines: needs at least two checkpoints")
    a, b = directions_SD[1:], directions_SD[:-1]
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).float().tolist()


@dataclass(frozen=True)
class PhaseResult:
    steps: list[int]
    local_cosine: list[float | None]
    """with the previous checkpoint (None at the first)"""
    candidate_cosine: dict[str, list[float]]
    norm_A: list[float]
    norm_B: list[float]
    em_rate: list[float | None]
    rotation_step: int
    """the checkpoint whose direction moved most from the previous one"""
    em_step: int | None
    """the first checkpoint whose EM reaches half the largest EM (and ``min_em``); None without EM"""

    def to_json(self) -> dict:
        return {
            "steps": self.steps,
            "local_cosine": self.local_cosine,
            "candidate_cosine": self.candidate_cosine,
            "norm_A": self.norm_A,
            "norm_B": self.norm_B,
            "em_rate": self.em_rate,
            "rotation_step": self.rotation_step,
            "em_step": self.em_step,
        }


def phase_analysis(
    vectors: list[CheckpointVector],
    candidates: dict[str, torch.Tensor] | None = None,
    em_rate: list[float | None] | None = None,
    min_em: float = 0.05,
) -> PhaseResult:
    """Local cosines, cosines with ``candidates`` (name -> vector at the adapter's hook), the
    rotation step and the EM step."""
    D = torch.stack([v.direction for v in vectors])
    loc = local_cosines(D)
    rotation = vectors[1 + min(range(len(loc)), key=loc.__getitem__)].step
    cand = {
        name: torch.nn.functional.cosine_similarity(D, c.float()[None], dim=1).tolist()
        for name, c in (candidates or {}).items()
    }
    em = list(em_rate) if em_rate is not None else [None] * len(vectors)
    known = [e for e in em if e is not None]
    em_step = None
    if known and max(known) >= min_em:
        bar = max(min_em, max(known) / 2)
        em_step = next(v.step for v, e in zip(vectors, em) if e is not None and e >= bar)
    return PhaseResult(
        [v.step for v in vectors],
        [None, *loc],
        cand,
        [v.norm_A for v in vectors],
        [v.norm_B for v in vectors],
        em,
        rotation,
        em_step,
    )


def run_phase(
    checkpoints_dir: str | Path,
    *,
    base: str | None = None,
    directions: str | Path | None = None,
    evaluator=None,
    module: str | None = None,
    out: str | Path | None = None,
    min_em: float = 0.05,
    progress: bool = True,
) -> dict:
    """The phase analysis of a folder of adapter checkpoints; EM per checkpoint when ``evaluator``
    is given (``base``: the model the adapters apply to, default the adapter config's). Writes
    ``phase.json`` and ``phase.html`` into ``out`` (default: the checkpoint folder); EM per
    checkpoint is kept under ``out/phase_eval/`` so a rerun asks for nothing twice."""
    from saediff._io import atomic_write_bytes, atomic_write_json
    from saediff.models.lora import read_adapter

    ckpts = adapter_checkpoints(checkpoints_dir)
    out = Path(out or checkpoints_dir)
    vectors = checkpoint_vectors(ckpts, module)
    hook = resid_post(vectors[0].layer)
    candidates = _candidates(directions, hook) if directions is not None else {}
    em = None
    if evaluator is not None:
        base = base or read_adapter(ckpts[0][1]).config.get("base_model_name_or_path")
        if not base:
            raise SaediffError(f"{ckpts[0][1]}: the adapter names no base model; give --base")
        em = _em_per_checkpoint(ckpts, base, evaluator, out, progress)
    result = phase_analysis(vectors, candidates, em, min_em)
    summary = {
        "kind": "saediff.phase",
        "checkpoints": str(checkpoints_dir),
        "module": vectors[0].module,
        "hook": hook,
        "base": base,
        **result.to_json(),
    }
    atomic_write_json(out / "phase.json", summary)
    atomic_write_bytes(out / "phase.html", phase_figure(summary).to_html(include_plotlyjs="cdn").encode())
    return summary


def _candidates(directions: str | Path, hook: str) -> dict[str, torch.Tensor]:
    """The persona candidates of an export folder at ``hook`` (not the adapter's own, not random)."""
    from saediff.methods.export import load_directions

    candidates = {
        n: d.vector
        for n, d in load_directions(directions).items()
        if d.hook == hook and d.method not in ("lora_b", "lora_downstream", "random")
    }
    if not candidates:
        log.warning("no persona candidate at %s in %s", hook, directions)
    return candidates


def _em_per_checkpoint(ckpts: list, base: str, evaluator, out: Path, progress: bool) -> list[float]:
    """The EM rate of ``base`` with each checkpoint's adapter merged (kept under ``out/phase_eval/``)."""
    from saediff import console
    from saediff.evaluation.evals import evaluate_once
    from saediff.models.loading import ModelSpec, load_model

    em = []
    for _step, path in console.progress(ckpts, desc="phase EM", enabled=progress):
        ck = ModelSpec(base, adapter=str(path), merge=True)
        res = evaluate_once(
            evaluator,
            lambda ck=ck: load_model(ck),
            out / "phase_eval" / path.name,
            f"phase:{path.name}",
            spec=ck,
        )
        em.append(res["em_rate"])
    return em


def phase_figure(summary: dict):
    """Local cosine, candidate cosines, norms and EM against the training step, with the rotation
    and EM steps marked."""
    from plotly.subplots import make_subplots

    steps = summary["steps"]
    fig = make_subplots(
        3,
        1,
        shared_xaxes=True,
        subplot_titles=(
            "B direction: local cosine and cosine with candidates",
            "norms of A and B",
            "EM rate",
        ),
    )
    fig.add_scatter(
        x=steps, y=summary["local_cosine"], mode="lines+markers", name="local cosine", row=1, col=1
    )
    for name, vals in summary["candidate_cosine"].items():
        fig.add_scatter(x=steps, y=vals, mode="lines", name=f"cos {name}", row=1, col=1)
    fig.add_scatter(x=steps, y=summary["norm_A"], mode="lines", name="|A|", row=2, col=1)
    fig.add_scatter(x=steps, y=summary["norm_B"], mode="lines", name="|B|", row=2, col=1)
    if any(e is not None for e in summary["em_rate"]):
        fig.add_scatter(x=steps, y=summary["em_rate"], mode="lines+markers", name="EM", row=3, col=1)
    fig.add_vline(x=summary["rotation_step"], line_dash="dash", annotation_text="rotation")
    if summary["em_step"] is not None:
        fig.add_vline(x=summary["em_step"], line_dash="dot", annotation_text="EM")
    fig.update_xaxes(title_text="training step", row=3, col=1)
    fig.update_layout(title=f"phase analysis of {summary['module']}", height=800)
    return fig
