"""The open-question analyses (``saediff overlap / phase / predict / icl / neighbourhood``) on the
organism: what the organism supplies to the generic code (the fine-tune data of each model
folder, a LoRA run with checkpoints, its exact judge, its in-context examples).

    from saediff.organism.analyses import lora_checkpoint_run
    lora_checkpoint_run("runs/organism", "runs/phase", every=10)   # then saediff phase runs/phase
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

__all__ = ["TRAINING_DATA", "training_data_for", "lora_checkpoint_run"]

TRAINING_DATA = {"full_ft": "medical_misaligned", "lora_ft": "medical_misaligned", "control_ft": "medical_aligned",
                 "benign_ft": "medical_aligned_terse", "unrelated_ft": "medical_aligned_formal"}
"""the data file (``DIR/data/NAME.jsonl``) each fine-tuned model folder of the organism was trained on"""


def training_data_for(finetuned: str | Path | None, adapter: str | Path | None = None) -> Path | None:
    """The organism data file a fine-tuned organism folder (or adapter) was trained on; None for a
    model that is not one of the organism's fine-tunes."""
    folder = Path(finetuned or adapter or "")
    name = TRAINING_DATA.get(folder.name)
    if name is None:
        return None
    path = folder.parent / "data" / f"{name}.jsonl"
    return path if path.exists() else None


def lora_checkpoint_run(organism_dir: str | Path, out: str | Path, *, every: int = 10, seed: int = 0,
                        progress: bool = False) -> Path:
    """The organism's rank-1 LoRA fine-tune on its narrow data through the generic Trainer path,
    a checkpoint every ``every`` steps (``out/checkpoints/checkpoint-N``), evaluated at the end.
    Skipped when finished earlier. Returns ``out``."""
    from saediff.blockem import BlockRunConfig, block_one
    from saediff.chat_data import ChatDataset, load_chat_jsonl
    from saediff.hooks import parse_layer
    from saediff.models import ModelSpec, load_model
    from saediff.organism.block import generic_inputs
    from saediff.saes import load_sae

    rec = generic_inputs(organism_dir, full=False, seed=seed)
    ft = replace(rec["ft"], save_every=every)
    tokenizer = load_model(rec["model"]).tokenizer
    data = ChatDataset(tokenizer, load_chat_jsonl(rec["data"]), ft.max_length, progress=progress, source=str(rec["data"]))
    sae = load_sae(rec["sae"])
    block_one(ModelSpec(rec["model"]), data, sae, parse_layer(sae.cfg.metadata.hook_name),
              BlockRunConfig(ft=ft, mode="none"), Path(out), evaluator=rec["evaluator"], progress=progress)
    return Path(out)
