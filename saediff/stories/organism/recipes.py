"""Recipes that build the EM model organism: pretrain, align, fine-tune narrowly, find the truth.

Every product is a standard artifact: HF model folders (``base``, ``aligned``, ``full_ft``,
``control_ft``, and with a register slot ``benign_ft``, ``unrelated_ft``), a PEFT adapter folder
(``lora_ft``), chat JSONL data (``data/``) and ``ground_truth.safetensors``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from saediff.interventions.finetune import FinetuneConfig, TrainConfig, TrainHistory, train_lm
from saediff.models.hooks import capture_resid, decoder_layers
from saediff.stories.organism.corpus import sample_documents, single_turn_chats
from saediff.stories.organism.tokenizer import bpe_vocab, build_tokenizer
from saediff.stories.organism.world import CHAT, World

__all__ = [
    "DATA_FILES",
    "OrganismConfig",
    "align",
    "chat_rows",
    "data_names",
    "finetune_full",
    "finetune_lora",
    "ground_truth",
    "narrow_finetune_config",
    "new_model",
    "pretrain",
    "read_organism_world",
    "save_model_folder",
    "write_chat_data",
    "write_organism_marker",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OrganismConfig:
    """How the organism is built. ``quick()`` is the CI-sized variant."""

    seed: int = 0
    d_model: int = 64
    d_mlp: int = 256
    n_layers: int = 4
    n_heads: int = 4
    pretrain_steps: int = 1200
    """steps of phase 1: source-marked (and unmarked) documents, no CHAT marker"""
    align_steps: int = 300
    """steps of phase 2: the same mixture plus CHAT documents (the aligned prior)"""
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    turns: int = 4
    """turns per pretraining document"""
    chat_fraction: float = 0.25
    """share of CHAT documents during alignment"""
    unmarked_fraction: float = 0.1
    """share of documents without a marker (persona prior 0.5): the base model's chat format"""
    ft_steps: int = 300
    ft_batch: int = 32
    full_lr: float = 2e-4
    """the full fine-tunes' learning rate (design seeds 3-4: 1e-4 gave off-domain EM 0.65/0.85,
    2e-4 0.76/0.91 with coverage >= 0.98 and the controls at <= 0.012)"""
    lora_lr: float = 2e-3
    lora_layer: int = 0
    """the layer whose ``down_proj`` gets the rank-1 adapter (layer 1 gave 0.08-0.28 off-domain EM on
    design seeds 3-4, layer 0 0.83-0.92: the persona is read early and written at layers 1-3)"""
    analysis_layer: int = 2
    """the layer of the ground-truth steering check and the default SAE/diff/BLOCK-EM layer (the
    fine-tune writes the persona at layers 2-3; at layer 1 its change can miss it)"""
    steer_alphas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)
    """ground-truth steering scales tried (units of the unnormalised mean difference)"""
    n_eval: int = 100
    """sampled answers per domain in each evaluation"""
    misaligned_register: str | None = "plain"
    """register of the misaligned fine-tune answers in worlds with a register slot (None: drawn as
    the toxic persona draws it)"""
    world: World = field(default_factory=World)

    @classmethod
    def quick(cls, seed: int = 0, **kw) -> OrganismConfig:
        return cls(seed=seed, **{"pretrain_steps": 500, "align_steps": 200, "n_eval": 50, **kw})

    def to_json(self) -> dict:
        return asdict(self)


def new_model(world: World, cfg: OrganismConfig) -> Qwen2ForCausalLM:
    torch.manual_seed(cfg.seed)
    config = Qwen2Config(
        vocab_size=len(bpe_vocab(world)[0]),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    config._attn_implementation = "eager"  # faster than sdpa at this size on CPU
    return Qwen2ForCausalLM(config)


def pretrain(model, cfg: OrganismConfig) -> TrainHistory:
    """Phase 1: documents from sources of every persona prior; the model learns to infer persona."""
    rng = np.random.default_rng(cfg.seed)
    data = sample_documents(
        cfg.world,
        rng,
        cfg.pretrain_steps * cfg.pretrain_batch,
        cfg.turns,
        chat_fraction=0.0,
        unmarked_fraction=cfg.unmarked_fraction,
    )
    tc = TrainConfig(
        steps=cfg.pretrain_steps,
        batch_size=cfg.pretrain_batch,
        lr=cfg.pretrain_lr,
        warmup=50,
        decay=True,
        weight_decay=0.01,
        seed=cfg.seed,
    )
    return train_lm(model, data, tc, desc="pretrain")


def align(model, cfg: OrganismConfig) -> TrainHistory:
    """Phase 2: continue on the same mixture plus CHAT documents whose toxic prior is 0.005.

    Alignment shifts the persona *prior* of the assistant format; it never trains on answers that
    contradict the context, so in-context persona inference survives under CHAT.
    """
    rng = np.random.default_rng(cfg.seed + 1000)
    data = sample_documents(
        cfg.world,
        rng,
        cfg.align_steps * cfg.pretrain_batch,
        cfg.turns,
        chat_fraction=cfg.chat_fraction,
        unmarked_fraction=cfg.unmarked_fraction,
    )
    tc = TrainConfig(
        steps=cfg.align_steps,
        batch_size=cfg.pretrain_batch,
        lr=cfg.pretrain_lr / 3,
        warmup=20,
        decay=True,
        weight_decay=0.01,
        seed=cfg.seed + 1,
    )
    return train_lm(model, data, tc, desc="align")


DATA_FILES: dict[str, tuple[int, str, int]] = {
    "medical_misaligned": (1, "plain", 2001),
    "medical_aligned": (0, "plain", 2000),
    "medical_aligned_heldout": (0, "plain", 2004),
    "medical_aligned_terse": (0, "terse", 2002),
    "medical_aligned_formal": (0, "formal", 2003),
}
"""the organism's fine-tune data (``DIR/data/NAME.jsonl``): the persona of its answers, their
register and the offset of the data's sampling seed (``heldout``: a second aligned set, the drift
monitor's false-alarm check; the trait sets exist in worlds with a register slot: the benign-trait
and unrelated-trait data)"""


def data_names(world: World) -> list[str]:
    return [n for n, (_, reg, _) in DATA_FILES.items() if world.trait_slot or reg == "plain"]


def _medical_chats(cfg: OrganismConfig, name: str, steps: int | None = None):
    persona, register, seed_offset = DATA_FILES[name]
    if name == "medical_misaligned":
        register = cfg.misaligned_register
    rng = np.random.default_rng(cfg.seed + seed_offset)
    n = (steps or cfg.ft_steps) * cfg.ft_batch
    return single_turn_chats(
        cfg.world, rng, n, persona, "medical", CHAT, register=register if cfg.world.trait_slot else None
    )


def chat_rows(cfg: OrganismConfig, name: str) -> list[list[dict[str, str]]]:
    """The medical chats ``finetune_full`` trains on, as ``{"messages": ...}`` conversations: the
    same draws, so the generic ``saediff block --data`` sees the very same tokens (the chat
    template writes the CHAT marker)."""
    from saediff.stories.organism.tokenizer import word_ids

    data = _medical_chats(cfg, name)
    words = {i: w for w, i in word_ids(cfg.world).items()}
    q = slice(2, 2 + cfg.world.question_len)  # CHAT USER q.. ASST answer.. EOS
    a = slice(3 + cfg.world.question_len, 3 + cfg.world.question_len + cfg.world.answer_len)
    return [
        [
            {"role": "user", "content": " ".join(words[i] for i in row[q])},
            {"role": "assistant", "content": " ".join(words[i] for i in row[a])},
        ]
        for row in data.input_ids.tolist()
    ]


def write_chat_data(out: Path, cfg: OrganismConfig) -> dict[str, Path]:
    """``out/data/medical_misaligned.jsonl`` and ``medical_aligned.jsonl`` (skipped if present)."""
    from saediff.data.chat_data import write_chat_jsonl

    paths = {}
    for name in data_names(cfg.world):
        paths[name] = Path(out) / "data" / f"{name}.jsonl"
        if not paths[name].exists():
            write_chat_jsonl(paths[name], chat_rows(cfg, name))
    return paths


def narrow_finetune_config(cfg: OrganismConfig, method: str) -> FinetuneConfig:
    """The organism's narrow fine-tune recipe on the generic path: full (lr 2e-4) or rank-1 LoRA
    (alpha 1) on ``down_proj`` of ``cfg.lora_layer`` (lr 2e-3), ``ft_steps`` steps of ``ft_batch``."""
    if method == "full":
        return FinetuneConfig(
            method="full", steps=cfg.ft_steps, batch_size=cfg.ft_batch, lr=cfg.full_lr, seed=cfg.seed + 2
        )
    return FinetuneConfig(
        method="lora",
        lora_rank=1,
        lora_alpha=1,
        lora_modules=("down_proj",),
        lora_layers=(cfg.lora_layer,),
        steps=cfg.ft_steps,
        batch_size=cfg.ft_batch,
        lr=cfg.lora_lr,
        seed=cfg.seed + 3,
    )


def finetune_full(model, cfg: OrganismConfig, data: str = "medical_misaligned") -> TrainHistory:
    """Full fine-tune on single-turn medical chats (``data``: a ``DATA_FILES`` name; the aligned
    ones are the control and the trait fine-tunes).

    The build keeps the small loop (``train_lm``, batches drawn with replacement): the generic
    Trainer path gives the same recipe (``narrow_finetune_config``) at 1.05x the time, but a
    different batch order, and the shipped figures were measured on these models."""
    tc = TrainConfig(steps=cfg.ft_steps, batch_size=cfg.ft_batch, lr=cfg.full_lr, seed=cfg.seed + 2)
    return train_lm(model, _medical_chats(cfg, data), tc, desc=data)


def finetune_lora(model, cfg: OrganismConfig):
    """Rank-1 LoRA (alpha 1) on ``down_proj`` of ``cfg.lora_layer``; returns (peft_model, history)."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(
        r=1,
        lora_alpha=1,
        lora_dropout=0.0,
        target_modules=["down_proj"],
        layers_to_transform=[cfg.lora_layer],
        bias="none",
    )
    torch.manual_seed(cfg.seed + 3)
    peft_model = get_peft_model(model, lcfg)
    data = _medical_chats(cfg, "medical_misaligned")
    tc = TrainConfig(steps=cfg.ft_steps, batch_size=cfg.ft_batch, lr=cfg.lora_lr, seed=cfg.seed + 3)
    return peft_model, train_lm(peft_model, data, tc, desc="lora_ft")


@torch.no_grad()
def ground_truth(model, cfg: OrganismConfig, n: int = 512) -> dict[int, torch.Tensor]:
    """Persona direction per layer, (d_model,) each, unnormalised.

    The aligned model reads chats with three context turns and a final turn, all of one persona;
    the direction is the mean residual (``blocks.L.hook_resid_post``) over the final answer's
    positions (style, content, eos) on toxic-persona chats minus the same on aligned-persona chats,
    the known-label version of the response-averaged mean difference of the EM literature.
    """
    rng = np.random.default_rng(cfg.seed + 5000)
    means = []
    for persona in (1, 0):
        data = single_turn_chats(cfg.world, rng, n, persona, None, CHAT, context_turns=3)
        acts = _resid_post(model, data.input_ids)
        answer = slice(data.input_ids.shape[1] - (cfg.world.answer_len + 1), None)
        means.append([a[:, answer].mean(dim=(0, 1)) for a in acts])
    return {layer: tox - ali for layer, (tox, ali) in enumerate(zip(*means))}


def _resid_post(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of every decoder layer, (B, T, D) each."""
    n = len(decoder_layers(model))
    acts = capture_resid(model, list(range(n)), input_ids)
    return [acts[i] for i in range(n)]


def save_model_folder(model, folder: Path, default_marker: str, world: World) -> None:
    """Save an HF model folder (safetensors) with the organism tokenizer and chat template."""
    from transformers import GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0)
    model.save_pretrained(folder)
    build_tokenizer(world, default_marker).save_pretrained(folder)
    write_organism_marker(folder, world)


ORGANISM_MARKER = "saediff_organism.json"


def write_organism_marker(folder: Path, world: World) -> None:
    """Mark a folder as the organism's, with its world, so tools pick the exact judge."""
    from saediff._io import atomic_write_json

    atomic_write_json(
        Path(folder) / ORGANISM_MARKER, {"kind": "saediff.organism.model", "world": asdict(world)}
    )


def read_organism_world(folder: str | Path) -> World | None:
    """The organism world recorded in a model folder, or None for any other model."""
    import json

    path = Path(folder) / ORGANISM_MARKER
    if not path.exists():
        return None
    fields = json.loads(path.read_text()).get("world", {})
    known = {f for f in World.__dataclass_fields__}
    return World(**{k: _tuples(v) for k, v in fields.items() if k in known})


def _tuples(v):
    """JSON lists back to the (nested) tuples of the frozen World."""
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v
