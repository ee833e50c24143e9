"""``saediff diff`` on a real-model recipe: rank-r adapters (the r32 all-projection recipe) give the
top-r residual directions of each residual-writing module; ``--samples`` answers per prompt;
``--layers``: hooks only on the blocks the requested outputs need."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import make_random_sae, make_tiny_qwen
from typer.testing import CliRunner

from saediff.cli.app import app
from saediff.methods.directions import lora_b_directions
from saediff.models.lora import read_adapter

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _write_adapter(folder, tensors: dict, **config):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {f"base_model.model.model.layers.{k}.weight": v.clone().contiguous() for k, v in tensors.items()},
        str(folder / "adapter_model.safetensors"),
    )
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))


def test_rank2_adapter_directions_exact(tmp_path):
    """Hand-set rank-2 modules with a known SVD: B @ A = 3 u0 v0^T - 2 u1 v1^T (u, v orthonormal),
    so the singular values are 3 and 2 times the rsLoRA scale 4 / sqrt(2), the directions u0 and
    u1 (sign: largest entry positive) times them; q_proj writes no residual direction."""
    u0, u1 = torch.tensor([0.6, 0.8, 0.0, 0.0]), torch.tensor([0.8, -0.6, 0.0, 0.0])
    v0, v1 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.6, 0.8])
    B = torch.stack([2 * u0, u1], 1)  # (d_out 4, r 2)
    A = torch.stack([1.5 * v0, -2 * v1])  # (r 2, d_in 3)
    _write_adapter(
        tmp_path / "ad",
        {
            "1.mlp.down_proj.lora_A": A,
            "1.mlp.down_proj.lora_B": B,
            "0.self_attn.o_proj.lora_A": A,
            "0.self_attn.o_proj.lora_B": -B,
            "0.self_attn.q_proj.lora_A": A,
            "0.self_attn.q_proj.lora_B": B,
        },
        r=2,
        lora_alpha=4,
        use_rslora=True,
    )
    ad = read_adapter(tmp_path / "ad")
    scale = 4 / math.sqrt(2)
    dirs = {d.name: d for d in lora_b_directions(ad)}
    assert set(dirs) == {"lora_b_L1_s0", "lora_b_L1_s1", "lora_b_o_proj_L0_s0", "lora_b_o_proj_L0_s1"}
    for prefix, L in (("lora_b_L1", 1), ("lora_b_o_proj_L0", 0)):
        s0, s1 = dirs[f"{prefix}_s0"], dirs[f"{prefix}_s1"]
        torch.testing.assert_close(s0.vector, 3 * scale * u0)  # -B flips the signs back: same vectors
        torch.testing.assert_close(s1.vector, 2 * scale * u1)
        assert s0.hook == s1.hook == f"blocks.{L}.hook_resid_post" and s0.method == "lora_b"
        assert s0.provenance["singular_value"] == pytest.approx(3 * scale)
        assert s1.provenance["singular_value"] == pytest.approx(2 * scale)
        assert (s0.provenance["singular_index"], s1.provenance["singular_index"]) == (0, 1)
        assert s0.provenance["scale"] == pytest.approx(scale) and s0.provenance["rslora"] is True
        assert s0.provenance["rank"] == 2 and s0.provenance["layer"] == L
    assert dirs["lora_b_L1_s0"].provenance["module"] == "model.layers.1.mlp.down_proj"
    assert dirs["lora_b_L1_s0"].provenance["writes_into"] == "blocks.1.hook_resid_post"
    assert dirs["lora_b_o_proj_L0_s0"].provenance["writes_into"] == "blocks.0.hook_resid_mid"
    U, S, V = ad.modules["model.layers.1.mlp.down_proj"].svd()
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, scale * B @ A)
    # alpha / r without rsLoRA
    _write_adapter(
        tmp_path / "plain", {"1.mlp.down_proj.lora_A": A, "1.mlp.down_proj.lora_B": B}, r=2, lora_alpha=4
    )
    d = {x.name: x for x in lora_b_directions(read_adapter(tmp_path / "plain"))}
    torch.testing.assert_close(d["lora_b_L1_s0"].vector, 3 * 2.0 * u0)


def test_rank1_adapter_gives_todays_direction(tiny_qwen):
    ad = read_adapter(tiny_qwen / "lora")
    m = ad.modules["model.layers.1.mlp.down_proj"]
    (d,) = lora_b_directions(ad)
    assert d.name == "lora_b_L1" and d.hook == "blocks.1.hook_resid_post"
    torch.testing.assert_close(d.vector, m.B[:, 0] * m.scale)
    assert d.provenance == {"module": m.name, "scale": m.scale, "adapter": str(ad.path)}


@pytest.fixture(scope="module")
def deep_qwen(tmp_path_factory):
    """A 4-block tiny Qwen2, an r=4 rsLoRA adapter on every projection (the README's r32 recipe,
    smaller) and an SAE at block 1."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("deep_qwen")
    make_tiny_qwen(root / "model", n_layers=4)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ALL_PROJ, use_rslora=True, init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(root / "lora")
    make_random_sae(root / "sae", 32, "blocks.1.hook_resid_post")
    return root


def _hooked_blocks(monkeypatch) -> list[int]:
    """Records the decoder blocks (by ``layer_idx``) any forward hook is registered on, from here on."""
    seen: list[int] = []
    original = torch.nn.Module.register_forward_hook

    def spy(self, *args, **kwargs):
        if type(self).__name__.endswith("DecoderLayer"):
            seen.append(self.self_attn.layer_idx)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "register_forward_hook", spy)
    return seen


def test_diff_hooks_only_the_blocks_it_needs(deep_qwen, tmp_path, monkeypatch):
    """layers='sae': both models are hooked at the SAE's block (1) alone, and the per-layer
    directions exist there only, equal to those of a run over every block, as is the SAE diff."""
    from saediff.methods.diff_run import run_diff

    kw = {"adapter": str(deep_qwen / "lora"), "prompts": "first_plot", "max_new_tokens": 3, "batch_size": 3}
    seen = _hooked_blocks(monkeypatch)
    run_diff(str(deep_qwen / "model"), None, str(deep_qwen / "sae"), tmp_path / "sae", layers="sae", **kw)
    assert seen and set(seen) == {1}
    seen.clear()
    run_diff(str(deep_qwen / "model"), None, str(deep_qwen / "sae"), tmp_path / "some", layers=[2], **kw)
    assert set(seen) == {1, 2}
    monkeypatch.undo()
    run_diff(str(deep_qwen / "model"), None, str(deep_qwen / "sae"), tmp_path / "all", **kw)
    from saediff.methods.export import load_directions

    one, some, every = (load_directions(tmp_path / n / "directions") for n in ("sae", "some", "all"))

    def induced(ds):
        return {n for n in ds if n.startswith("lora_downstream_")}

    assert induced(one) == {"lora_downstream_L1"} and induced(some) == {
        "lora_downstream_L1",
        "lora_downstream_L2",
    }
    assert induced(every) == {f"lora_downstream_L{L}" for L in range(4)}
    for name in ("lora_downstream_L1", *[n for n in one if n.startswith("sae_")]):
        torch.testing.assert_close(one[name].vector, every[name].vector)
    torch.testing.assert_close(some["lora_downstream_L2"].vector, every["lora_downstream_L2"].vector)
    assert json.loads((tmp_path / "sae" / "diff.json").read_text()) == json.loads(
        (tmp_path / "all" / "diff.json").read_text()
    )
    # the r=4 all-projection adapter: 4 directions per o_proj and down_proj, none for q/k/v/gate/up
    lora = sorted(n for n, d in one.items() if d.method == "lora_b")
    assert lora == sorted(f"lora_b{p}_L{L}_s{i}" for p in ("", "_o_proj") for L in range(4) for i in range(4))
    assert json.loads((tmp_path / "sae" / "run.json").read_text())["steps"]["diff"]["layers"] == [1]


def test_diff_cli_samples_batch_size_and_compare(deep_qwen, tmp_path):
    """saediff diff --samples 3: every first-plot question answered three times (seeded), all 24
    answers streamed; compare and export still work on the run with the rank-4 adapter."""
    run = tmp_path / "run"
    args = [
        "diff",
        "--base",
        str(deep_qwen / "model"),
        "--adapter",
        str(deep_qwen / "lora"),
        "--sae",
        str(deep_qwen / "sae"),
        "--prompts",
        "first_plot",
        "--max-new-tokens",
        "4",
        "--samples",
        "3",
        "--batch-size",
        "5",
        "--top",
        "2",
        "--seed",
        "1",
        "--layers",
        "sae",
    ]
    r = CliRunner().invoke(app, [*args, "--out", str(run)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (run / "responses.jsonl").read_text().splitlines()]
    assert (
        len(rows) == 24 and rows[0]["id"] == "what_is_your_wish:0" and rows[2]["id"] == "what_is_your_wish:2"
    )
    assert len({r["response"] for r in rows[:3]}) > 1  # sampled, not three copies
    summary = json.loads((run / "run.json").read_text())["steps"]["diff"]
    assert summary["n_prompts"] == 24 and summary["samples"] == 3 and summary["layers"] == [1]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "again")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again" / "responses.jsonl").read_text() == (run / "responses.jsonl").read_text()
    r = CliRunner().invoke(app, ["compare", str(run)])
    assert r.exit_code == 0, r.output
    cos = json.loads((run / "cosines.json").read_text())
    assert "lora_b_L1_s0" in cos["names"] and "lora_b_L1_s1" not in cos["names"]  # the top one in the table
    spans = cos["lora_spans"]["model.layers.1.mlp.down_proj"]
    assert len(spans["span"]) == 4 and "lora_downstream_L1" in spans["per_direction"]
    r = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, [*args, "--layers", "9", "--out", str(tmp_path / "bad")])
    assert r.exit_code == 1 and "layers [9] outside the model's blocks 0..3" in r.output


def test_sampled_answers_are_generates_own(deep_qwen, tmp_path):
    """run_diff's answers are ``generate``'s with its default batching (seeded sampling depends on
    the batches: a diff of 40 answers samples them as saediff eval / generate would); samples with
    --responses is refused."""
    from saediff.data.prompts import load_prompts
    from saediff.methods.diff_run import run_diff
    from saediff.models.loading import ModelSpec, generate, load_model

    run_diff(
        str(deep_qwen / "model"),
        None,
        str(deep_qwen / "sae"),
        tmp_path / "run",
        adapter=str(deep_qwen / "lora"),
        prompts="first_plot",
        max_new_tokens=3,
        samples=5,
        layers="sae",
        seed=2,
    )
    got = [json.loads(x)["response"] for x in (tmp_path / "run" / "responses.jsonl").read_text().splitlines()]
    lm = load_model(ModelSpec(str(deep_qwen / "model"), adapter=str(deep_qwen / "lora"), merge=True))
    msgs = [p.messages for p in load_prompts("first_plot") for _ in range(5)]
    assert got == [a.strip() for a in generate(lm, msgs, max_new_tokens=3, seed=2, progress=False)]
    from saediff.errors import SaediffError

    with pytest.raises(SaediffError, match="samples=3 applies to generated answers"):
        run_diff(
            str(deep_qwen / "model"),
            None,
            str(deep_qwen / "sae"),
            tmp_path / "r2",
            responses="x.jsonl",
            samples=3,
        )
