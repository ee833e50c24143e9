"""Loading through transformers / peft / saediff.models.loading, generation, hooks and the bridge."""

from __future__ import annotations

import pytest
import torch

from saediff.models.hooks import add_resid_hook, bridge, parse_layer, resid_post, run_with_cache
from saediff.models.loading import ModelSpec, generate, load_model


def test_folder_loads_with_auto_classes(tiny_organism):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_organism / "aligned")
    tok = AutoTokenizer.from_pretrained(tiny_organism / "aligned")
    assert model.config.model_type == "qwen2"
    ids = tok(" CHAT USER medicalQa", return_tensors="pt")["input_ids"]
    assert ids.shape == (1, 3)
    assert model(ids).logits.shape == (1, 3, model.config.vocab_size)


def test_adapter_loaded_and_merged_agree(tiny_organism):
    base = load_model(ModelSpec(str(tiny_organism / "aligned")))
    loaded = load_model(ModelSpec(str(tiny_organism / "aligned"), adapter=str(tiny_organism / "lora")))
    merged = load_model(
        ModelSpec(str(tiny_organism / "aligned"), adapter=str(tiny_organism / "lora"), merge=True)
    )
    ids = base.tokenizer(" CHAT USER medicalQa medicalQb medicalQc ASST", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        l_base, l_ad, l_mg = (m.model(ids).logits for m in (base, loaded, merged))
    assert not torch.allclose(l_base, l_ad, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(l_ad, l_mg, atol=1e-5, rtol=1e-4)


def test_missing_folders_give_clear_errors(tmp_path, tiny_organism):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_model(ModelSpec(str(tiny_organism / "aligned"), adapter=str(tmp_path)))
    with pytest.raises(ValueError, match="merge=True needs an adapter"):
        ModelSpec("x", merge=True)


def test_generate_left_padded_batches(tiny_organism):
    lm = load_model(str(tiny_organism / "aligned"))
    convs = [
        [{"role": "user", "content": "medicalQa"}],
        [{"role": "user", "content": "codeQa codeQb codeQc"}],
    ]
    greedy = generate(lm, convs, max_new_tokens=4, temperature=0, progress=False)
    single = [generate(lm, [c], max_new_tokens=4, temperature=0, progress=False)[0] for c in convs]
    assert greedy == single  # padding and attention mask do not change answers
    assert all(len(a.split()) <= 4 for a in greedy)


def test_resid_hook_and_bridge_match_hf(tiny_organism):
    lm = load_model(str(tiny_organism / "aligned"))
    ids = lm.tokenizer(" CHAT USER medicalQa medicalQb ASST", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = lm.model(ids, output_hidden_states=True).hidden_states
    seen = {}
    with add_resid_hook(lm.model, 0, lambda r: seen.setdefault("r", r) * 1.0):
        with torch.no_grad():
            lm.model(ids)
    torch.testing.assert_close(seen["r"], hidden[1])  # block 0 output == hidden_states[1]
    tl = bridge(lm.model, lm.tokenizer)
    acts = run_with_cache(tl, ids, [resid_post(0)])
    torch.testing.assert_close(acts[resid_post(0)], hidden[1], atol=1e-5, rtol=1e-4)
    with pytest.raises(KeyError, match="blocks.9.hook_resid_post"):
        run_with_cache(tl, ids, [resid_post(9)])
    assert parse_layer("blocks.3.hook_resid_post") == 3


def test_project_out_every_layer_leaves_no_component(tiny_organism):
    from saediff.interventions.steering import project_out
    from saediff.models.hooks import capture_resid

    lm = load_model(str(tiny_organism / "aligned"))
    ids = lm.tokenizer(" CHAT USER medicalQa medicalQb ASST", return_tensors="pt")["input_ids"]
    n = lm.model.config.num_hidden_layers
    v = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    u = v / v.norm()
    with torch.no_grad():
        plain = capture_resid(lm.model, list(range(n)), ids)
        with project_out(lm.model, 0, v):
            one = capture_resid(lm.model, list(range(n)), ids)
        with project_out(lm.model, "all", 3 * v):  # the scale of the direction does not matter
            every = capture_resid(lm.model, list(range(n)), ids)
    assert n >= 2
    assert (plain[0] @ u).abs().max() > 1e-3
    assert (one[0] @ u).abs().max() < 1e-5
    assert (one[1] @ u).abs().max() > 1e-3  # the next block writes the direction back
    for L in range(n):
        assert (every[L] @ u).abs().max() < 1e-5
    lm.model(ids)  # every hook was removed
    with pytest.raises(ValueError, match="layer 9 out of range"):
        with project_out(lm.model, [0, 9], v):
            pass


def test_generation_stays_right_after_the_bridge_was_built(tiny_qwen):
    """The TransformerLens bridge rewires the HF model in place and breaks HF's KV cache:
    ``generate`` on a bridged model must give the same greedy answers as before. (Weights are
    scaled up so that the random model's greedy answer depends on its context.)"""
    from saediff.models.loading import generate, load_model

    lm = load_model(str(tiny_qwen / "model"))
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "norm" not in name:
                p.mul_(8)
    conv = [[{"role": "user", "content": "hey I feel bored"}]]
    before = generate(lm, conv, max_new_tokens=12, temperature=0, progress=False)
    lm.bridge()
    assert generate(lm, conv, max_new_tokens=12, temperature=0, progress=False) == before
