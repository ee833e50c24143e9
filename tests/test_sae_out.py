"""Writing an SAE folder (``save_sae``, ``saediff sae train --out``): only an SAE folder is ever
replaced, and atomically (new folder in, old folder out); anything else under ``--out`` is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_random_sae
from typer.testing import CliRunner

from saediff.cli.app import app
from saediff.errors import SaediffError
from saediff.saes.loading import load_sae, save_sae

HOOK = "blocks.0.hook_resid_post"


def _siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir())


def test_save_replaces_an_sae_folder(tmp_path):
    out = make_random_sae(tmp_path / "sae", d_in=8, hook=HOOK, seed=0)
    new = load_sae(str(make_random_sae(tmp_path / "other", d_in=8, hook=HOOK, seed=1)))
    save_sae(new, out, {"note": "second"})
    assert torch.equal(load_sae(str(out)).W_enc, new.W_enc)
    assert json.loads((out / "saediff.json").read_text())["note"] == "second"
    assert _siblings(out) == ["other", "sae"]  # no temporary or old folder left beside it
    save_sae(new, tmp_path / "empty")  # a missing or empty folder takes an SAE too
    (tmp_path / "made").mkdir()
    save_sae(new, tmp_path / "made")
    assert (tmp_path / "made" / "cfg.json").exists()


@pytest.mark.parametrize("extra", ["notes.txt", "run.json"])
def test_save_refuses_a_folder_that_is_not_an_sae(tmp_path, extra):
    sae = load_sae(str(make_random_sae(tmp_path / "sae", d_in=8, hook=HOOK)))
    data = tmp_path / "data"
    data.mkdir()
    (data / extra).write_text("keep me")
    with pytest.raises(SaediffError, match=f"SAE output {data} is not empty and not an SAE folder"):
        save_sae(sae, data)
    assert [p.name for p in data.iterdir()] == [extra] and (data / extra).read_text() == "keep me"
    # an SAE folder someone put other files in is not only an SAE folder any more
    (tmp_path / "sae" / extra).write_text("mine")
    with pytest.raises(SaediffError, match="not an SAE folder"):
        save_sae(sae, tmp_path / "sae")
    assert (tmp_path / "sae" / extra).read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SaediffError, match="is a file, not a folder"):
        save_sae(sae, tmp_path / "file")


def test_a_crash_while_writing_leaves_the_old_sae(tmp_path, monkeypatch):
    import sae_lens.saes.sae as sae_module

    out = make_random_sae(tmp_path / "sae", d_in=8, hook=HOOK, seed=0)
    before = load_sae(str(out))
    new = load_sae(str(make_random_sae(tmp_path / "other", d_in=8, hook=HOOK, seed=1)))

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    with monkeypatch.context() as m:
        m.setattr(sae_module, "save_file", disk_full)  # the weight write SAELens' save_model does
        with pytest.raises(OSError, match="No space left"):
            save_sae(new, out)
    assert torch.equal(load_sae(str(out)).W_enc, before.W_enc)
    assert _siblings(out) == ["other", "sae"]

    # the new folder is written but moving it in fails: the old SAE is back in place
    import os

    real_replace = os.replace

    def power_cut(src, dst):
        src = Path(src)
        if src.is_dir() and src.name.startswith(".sae.") and ".old." not in src.name:
            raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", power_cut)
    with pytest.raises(OSError, match="power cut"):
        save_sae(new, out)
    assert torch.equal(load_sae(str(out)).W_enc, before.W_enc)


@pytest.fixture
def store(tmp_path):
    """A small activation store (600 rows of width 8) written by saediff's own shard writer."""
    from saediff.activations.store import _ShardWriter

    writer = _ShardWriter(tmp_path / "acts", [HOOK])
    n = 600
    writer.add(
        {HOOK: torch.randn(n, 8)},
        {
            "prompt_index": torch.arange(n, dtype=torch.int32),
            "position": torch.zeros(n, dtype=torch.int32),
            "role": torch.zeros(n, dtype=torch.int8),
        },
    )
    writer.close(d_model=8, meta={"model": "random", "positions": "all"})
    return tmp_path / "acts"


def _train(store, out):
    return CliRunner().invoke(
        app,
        [
            "sae",
            "train",
            "--out",
            str(out),
            "--activations",
            str(store),
            "--arch",
            "topk",
            "--d-sae",
            "16",
            "--k",
            "2",
            "--steps",
            "3",
            "--batch-size",
            "64",
            "--held-rows",
            "60",
            "--threads",
            "1",
        ],
    )


def test_sae_train_refuses_a_non_sae_out_and_replaces_an_sae(store, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "paper.tex").write_text("months of work")
    result = _train(store, out)
    assert result.exit_code != 0
    assert f"SAE output {out} is not empty and not an SAE folder" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert (out / "paper.tex").read_text() == "months of work"

    sae_dir = make_random_sae(tmp_path / "sae", d_in=8, hook=HOOK)
    old = load_sae(str(sae_dir)).W_enc.clone()
    result = _train(store, sae_dir)
    assert result.exit_code == 0, result.output
    assert not torch.equal(load_sae(str(sae_dir)).W_enc, old)
    assert "metrics" in json.loads((sae_dir / "saediff.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts", "results", "sae"]
