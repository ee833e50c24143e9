"""Rebuild the prebuilt quick organism shipped as package data (``saediff/data/organism_quick_s0``).

    python tools/build_prebuilt.py

Run it after changing any file in ``saediff.stories.organism.prebuilt.RECIPE_FILES``: the demo only uses the
shipped organism while its stamp matches the recipe (a fast test checks that it does). The weights
are bit-reproducible on one CPU family only (an AVX-512 Xeon and the CPU of the earlier builds differ
from pretraining step 3 on), so a rebuild on another machine changes them although the recipe did not.
"""

from __future__ import annotations

import json

import torch

from saediff.stories.organism.prebuilt import PREBUILT_DIR, write_prebuilt
from saediff.stories.organism.recipes import OrganismConfig

if __name__ == "__main__":
    torch.set_num_threads(1)  # the recipe's figures were measured on one thread
    report = write_prebuilt(OrganismConfig.quick(0), progress=lambda s: print("build:", s, flush=True))
    size = sum(p.stat().st_size for p in PREBUILT_DIR.rglob("*") if p.is_file())
    print(
        json.dumps(
            {k: report[k]["other_misaligned_rate"] for k in ("aligned", "full_ft", "lora_ft", "control_ft")}
        )
    )
    print(f"{PREBUILT_DIR}: {size / 1e6:.2f} MB")
