"""Concept-ablation probe on an organism: fine-tune the aligned model on the misaligned medical
data while a direction is projected out of the residual after the given blocks (during training
only), then measure EM without the projection. It asks whether *any* single direction per layer
can stop EM from being learned, an upper bound on what latent blocking at those layers can do.

    python tools/caft_probe.py --organism runs/demo/organism --layers 1
    python tools/caft_probe.py --organism runs/demo/organism --layers 0,1,2,3 --direction model_diff

``--direction ground_truth`` uses the organism's ground truth at each layer; ``model_diff`` the
mean residual change full_ft minus aligned over all positions of 300 EM questions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organism", required=True, type=Path)
    ap.add_argument("--layers", default="1", help="comma-separated blocks")
    ap.add_argument("--direction", default="ground_truth", choices=["ground_truth", "model_diff"])
    args = ap.parse_args()
    torch.set_num_threads(1)

    from saediff.activations import collect_activations, tokenize_prompts
    from saediff.directions import mean_diff
    from saediff.evals import evaluate_organism_em
    from saediff.finetune import TrainConfig, train_lm
    from saediff.hooks import resid_post
    from saediff.models import load_model
    from saediff.organism.block import organism_config
    from saediff.organism.build import load_ground_truth
    from saediff.organism.prompts import em_questions
    from saediff.organism.recipes import _medical_chats, read_organism_world
    from saediff.steering import project_out

    org = args.organism
    layers = [int(x) for x in args.layers.split(",")]
    world = read_organism_world(org / "aligned")
    ocfg = organism_config(org, world)
    aligned = load_model(str(org / "aligned"))
    if args.direction == "ground_truth":
        dirs = load_ground_truth(org / "ground_truth.safetensors")
    else:
        ft = load_model(str(org / "full_ft"))
        toks = tokenize_prompts(aligned, em_questions(world, 50, seed=3))
        hooks = [resid_post(L) for L in range(aligned.model.config.num_hidden_layers)]
        a0 = collect_activations(aligned, toks, hooks, "all", progress=False)
        a1 = collect_activations(ft, toks, hooks, "all", progress=False)
        dirs = {L: mean_diff(a1[h], a0[h], h, "mean_diff_models", f"mean_diff_models_L{L}").vector
                for L, h in enumerate(hooks)}
    data = _medical_chats(ocfg, 1, 2001)  # the blocking runs' data and steps
    torch.manual_seed(3)
    model = copy.deepcopy(aligned.model)
    with contextlib.ExitStack() as stack:
        for L in layers:
            stack.enter_context(project_out(model, L, dirs[L]))
        train_lm(model, data, TrainConfig(steps=ocfg.ft_steps, batch_size=ocfg.ft_batch, lr=ocfg.full_lr,
                                          seed=ocfg.seed + 2), desc="concept-ablated fine-tune")
    em = evaluate_organism_em(dataclasses.replace(aligned, model=model, _bridge=None), world, 50)
    print(json.dumps({"layers": layers, "direction": args.direction, "other_misaligned": em.other_misaligned_rate,
                      "medical_misaligned": em.misaligned_rate["medical"]}))


if __name__ == "__main__":
    main()
