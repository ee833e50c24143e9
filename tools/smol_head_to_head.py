"""The head-to-head on SmolLM2-135M-Instruct for one fine-tune seed (the README's table).

    python tools/smol_head_to_head.py --seed 0 --out runs/smol_h2h

Steps, each reused on a rerun:
- the demo's rank-1 LoRA on bad medical advice (``lora_bad``: every ``down_proj``, 150 steps) and its EM
  on the pair sets (``OUT/s{seed}``);
- the demo's block-15 SAE (``OUT/sae``, seed 0 for every fine-tune seed);
- the diff on the design split's teacher-forced references, with the base model's in-context direction
  (reused only while its fingerprint, ``h2h_diff/made_by.json``, matches the fine-tune, SAE, split and seed);
- ``run_head_to_head`` on the first 200 rows of the bad medical data, steering scored by the pair
  metric on the held-out split's halves (``OUT/s{seed}/h2h``), priced by KL on the base model's own
  answers to benign questions (``--kl-budget``), against the null at equal cost (the in-context
  direction's label-permuted null rebuilt from the same questions and shots as the diff's);
- the same on the style-crossed pairs' halves (``OUT/s{seed}/h2h_style_crossed``: misaligned answers
  in the careful register, aligned ones in the blunt one), so a method whose direction carries only
  the references' style shows. ``run_head_to_head`` takes one evaluator, so the methods are found
  again there (the same seeds: the same directions); both tables go to ``OUT/s{seed}/h2h_tables.md``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import torch

from saediff._io import atomic_write_json, read_json_if_exists
from saediff.analyses.head_to_head import HeadToHeadConfig, markdown_table, run_head_to_head
from saediff.data.em_data import data_path
from saediff.data.prompts import Prompt, load_prompts
from saediff.evaluation.pairs import pair_evaluator
from saediff.interventions.steer_protocol import DEFAULT_KL_BUDGET
from saediff.methods.in_context import InContextSource
from saediff.models.loading import ModelSpec
from saediff.models.provenance import digest, mismatch, model_fingerprint, sae_fingerprint
from saediff.saes.loading import load_sae
from saediff.stories.smollm2.demo import run_chat_demo
from saediff.stories.smollm2.diffs import diff_on_references, in_context_candidates
from saediff.stories.smollm2.prompts import contrast_examples
from saediff.stories.smollm2.recipe import DESIGN, HELDOUT, MEDICAL, ChatDemoRecipe
from saediff.stories.smollm2.recipe import pairs_of as _pairs_of
from saediff.stories.smollm2.sae import sae_step as _sae

MODEL = "smollm2-135m"
ICL_QUESTIONS = 48
STYLE_CROSSED = "style_crossed"

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="fine-tune seed")
    ap.add_argument("--out", type=Path, default=Path("runs/smol_h2h"))
    ap.add_argument(
        "--rows",
        type=int,
        default=200,
        help="rows of the bad medical data the crosscoder, diff-SAE and ADL read",
    )
    ap.add_argument(
        "--kl-budget",
        type=float,
        default=DEFAULT_KL_BUDGET,
        help="the most a steering vector may cost: mean KL per neutral token (nats)",
    )
    a = ap.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    say = lambda s: print(s, flush=True)
    root = a.out / f"s{a.seed}"
    recipe = ChatDemoRecipe(finetunes=("lora_bad",), story=False, pair_sets=(DESIGN, HELDOUT, MEDICAL))
    run_chat_demo(MODEL, root, seed=a.seed, recipe=recipe, progress=say)
    sae_dir = a.out / "sae"
    _sae(ModelSpec(MODEL), 15, sae_dir, 0, ChatDemoRecipe(), say)
    run, pairs = root / "h2h_diff", _pairs_of(DESIGN)
    finetune = root / "models" / "lora_bad" / "model"
    # what the diff run is of: reused only while it matches (a changed fine-tune, SAE, split or seed reruns it)
    made_by = {
        "base": model_fingerprint(ModelSpec(MODEL)),
        "finetuned": model_fingerprint(ModelSpec(str(finetune))),
        "sae": sae_fingerprint(load_sae(sae_dir), sae_dir),
        "pairs": digest([vars(p) for p in pairs]),
        "seed": a.seed,
        "top_n": 10,
        "in_context_shots": ICL_QUESTIONS,  # (it counts questions; the key kept so existing runs match)
    }
    stamp = run / "made_by.json"
    why = mismatch(read_json_if_exists(stamp), made_by) if (run / "run.json").exists() else "no diff run yet"
    if why is not None:
        say(f"diff run {run}: computing ({why})")
        shutil.rmtree(run, ignore_errors=True)
        t = time.perf_counter()
        icl = in_context_candidates(ModelSpec(MODEL), pairs, ICL_QUESTIONS, a.seed)
        diff_on_references(MODEL, None, str(finetune), sae_dir, pairs, run, top_n=10, seed=a.seed, extra=icl)
        atomic_write_json(stamp, made_by)
        say(f"diff and in-context direction: {time.perf_counter() - t:.0f} s")
    cfg = HeadToHeadConfig(crosscoder_steps=1000, diff_sae_steps=1000, kl_budget=a.kl_budget, seed=a.seed)
    # the questions and shots in_context_candidates built the run's in-context direction from
    questions = [
        Prompt(p.id, [{"role": "user", "content": p.question}], None, p.domain) for p in pairs[:ICL_QUESTIONS]
    ]
    tables = []
    for pair_set, folder in ((HELDOUT, "h2h"), (STYLE_CROSSED, "h2h_style_crossed")):
        res = run_head_to_head(
            run,
            root / folder,
            load_prompts(str(data_path("medical_bad")))[: a.rows],
            pair_evaluator(pair_set),
            contrast=pairs,
            cfg=cfg,
            in_context=InContextSource(questions, contrast_examples(), n_shots=3, seed=a.seed),
        )
        tables.append(f"## steering on {pair_set} (fine-tune seed {a.seed})\n\n{markdown_table(res)}\n")
        print(tables[-1], flush=True)
    (root / "h2h_tables.md").write_text("\n".join(tables))
