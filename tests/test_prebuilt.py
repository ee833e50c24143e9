"""The prebuilt quick organism: its stamp, when the demo uses it, and the shipped copy itself."""

from __future__ import annotations

import dataclasses
import json

from saediff.stories.organism.prebuilt import PREBUILT_DIR, copy_prebuilt, prebuilt_matches, recipe_stamp
from saediff.stories.organism.recipes import OrganismConfig


def test_stamp_follows_the_configuration():
    cfg = OrganismConfig.quick(0)
    assert recipe_stamp(cfg) == recipe_stamp(OrganismConfig.quick(0))
    assert recipe_stamp(cfg) != recipe_stamp(OrganismConfig.quick(1))
    assert recipe_stamp(cfg) != recipe_stamp(dataclasses.replace(cfg, full_lr=3e-4))


def test_stamp_reads_code_not_docs(tmp_path):
    from saediff.stories.organism.prebuilt import _code_of

    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    a.write_text('"""Doc."""\ndef f(x):\n    """Returns x."""\n    return x  # note\n')
    b.write_text('"""Other doc."""\n\ndef f(x):\n    return x\n')
    c.write_text("def f(x):\n    return x + 1\n")
    assert _code_of(a) == _code_of(b) != _code_of(c)


def test_copy_needs_a_matching_stamp_and_writes_the_data(tmp_path):
    cfg = OrganismConfig.quick(0, ft_steps=2, ft_batch=4)
    shipped = tmp_path / "shipped"
    (shipped / "aligned").mkdir(parents=True)
    (shipped / "organism.json").write_text("{}")
    assert not prebuilt_matches(cfg, shipped)  # no stamp
    (shipped / "stamp.json").write_text(json.dumps({"stamp": recipe_stamp(OrganismConfig.quick(1))}))
    assert not prebuilt_matches(cfg, shipped)  # another recipe's
    (shipped / "stamp.json").write_text(json.dumps({"stamp": recipe_stamp(cfg)}))
    assert prebuilt_matches(cfg, shipped)
    dest = copy_prebuilt(tmp_path / "demo" / "organism", cfg, shipped)
    assert (
        (dest / "aligned").is_dir()
        and (dest / "organism.json").exists()
        and not (dest / "stamp.json").exists()
    )
    assert sum(1 for _ in open(dest / "data" / "medical_misaligned.jsonl")) == 2 * 4
    assert not (tmp_path / "demo" / "organism.partial").exists()


def test_shipped_organism_is_this_recipes_and_small():
    """The demo only starts from the shipped organism while its stamp matches: a recipe change
    without ``python tools/build_prebuilt.py`` fails here, not silently in the demo's timing."""
    assert prebuilt_matches(OrganismConfig.quick(0)), "rebuild it: python tools/build_prebuilt.py"
    size = sum(p.stat().st_size for p in PREBUILT_DIR.rglob("*") if p.is_file())
    assert size <= 10e6
    report = json.loads((PREBUILT_DIR / "organism.json").read_text())
    assert (
        report["aligned"]["other_misaligned_rate"] <= 0.02
        and report["full_ft"]["other_misaligned_rate"] >= 0.2
    )
    assert (PREBUILT_DIR / "sae" / "cfg.json").exists()
