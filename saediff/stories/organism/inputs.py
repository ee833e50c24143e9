"""What the organism supplies to the generic runners when a model folder is one of its own: questions,
answer lengths, exact-judge labels, contrast examples and the ground truth per layer."""

from __future__ import annotations

from pathlib import Path

from saediff.errors import SaediffError
from saediff.methods.directions import Direction
from saediff.models.hooks import resid_post
from saediff.stories.organism.build import load_ground_truth
from saediff.stories.organism.judge import OrganismJudge
from saediff.stories.organism.prompts import contrast_examples, em_questions
from saediff.stories.organism.recipes import read_organism_world

__all__ = ["diff_inputs"]


def diff_inputs(base: str | Path, prompts: str = "organism:100", seed: int = 0) -> dict:
    """What the organism gives ``run_diff`` when ``base`` is one of its model folders: ``N``
    questions per domain (``organism:N``), answers as long as the language's, labels from the exact
    judge, its paired medical contrast examples, and the ground truth per layer."""
    world = read_organism_world(base)
    if world is None:
        raise SaediffError(f"{base} is not a saediff organism model folder")
    n = int(prompts.split(":", 1)[1]) if ":" in prompts else 100
    judge = OrganismJudge(world)
    gt_path = Path(base).parent / "ground_truth.safetensors"
    truth = (
        [
            Direction(f"ground_truth_L{L}", v, resid_post(L), "ground_truth")
            for L, v in load_ground_truth(gt_path).items()
        ]
        if gt_path.exists()
        else []
    )
    return {
        "prompts": em_questions(world, n, seed=seed + 7),
        "max_new_tokens": world.answer_len + 1,
        "labeller": lambda ps: [judge.judge(p.domain, p.response).misaligned for p in ps],
        "icl_examples": contrast_examples(world, 64, seed=seed + 11),
        "extra_directions": truth,
    }
