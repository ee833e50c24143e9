"""Fine-tunes of a model loaded in bfloat16 (``--dtype auto`` on a GPU): trainable weights are
float32 masters, so a small-lr step is not rounded away, and a full fine-tune's frozen reference
is the first blocks of the model, not a deep copy of all of it."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_qwen, write_narrow_data
from torch.profiler import ProfilerActivity, profile

from saediff.data.chat_data import ChatDataset, load_chat_jsonl
from saediff.interventions.block_runs import _reference
from saediff.interventions.finetune import FinetuneConfig, finetune, make_trainable
from saediff.models.hooks import capture_resid
from saediff.models.loading import ModelSpec, load_model

FULL = {"method": "full", "steps": 3, "batch_size": 4, "lr": 1e-5}


@pytest.fixture(scope="module")
def chats(tiny_qwen, tmp_path_factory):
    path = write_narrow_data(tmp_path_factory.mktemp("precision") / "data.jsonl", 8)
    tok = load_model(str(tiny_qwen / "model")).tokenizer
    return ChatDataset(tok, load_chat_jsonl(path), progress=False)


def _update(tiny_qwen, chats, out, dtype: str, precision: str, *, masters: bool = True):
    """Weight change (float32) of every tensor after a full fine-tune at lr 1e-5, and the dtypes
    the model trained in."""
    lm = load_model(ModelSpec(str(tiny_qwen / "model"), dtype=dtype))
    start = {k: v.detach().float().clone() for k, v in lm.model.named_parameters()}
    cfg = FinetuneConfig(**FULL, precision=precision)
    # masters=False: the pure-bfloat16 path saediff took before, the loaded weights trained as they are
    model = make_trainable(lm.model, cfg) if masters else lm.model.requires_grad_(True)
    finetune(model, lm.tokenizer, chats, cfg, out, progress=False)
    return {k: v.detach().float() - start[k] for k, v in model.named_parameters()}, {
        p.dtype for p in model.parameters()
    }


def _changed(update: dict[str, torch.Tensor]) -> float:
    return sum(int((u != 0).sum()) for u in update.values()) / sum(u.numel() for u in update.values())


def test_bf16_autocast_moves_the_weights_as_far_as_fp32(tiny_qwen, chats, tmp_path):
    """Loaded in bfloat16 and trained under bf16 autocast, three AdamW steps at lr 1e-5 change
    the weights as fp32 training does (every tensor's update norm within 10%); trained as
    bfloat16 weights, the same steps round away for most weights."""
    ref, _ = _update(tiny_qwen, chats, tmp_path / "fp32", "float32", "fp32")
    pure, _ = _update(tiny_qwen, chats, tmp_path / "pure", "bfloat16", "bf16", masters=False)
    assert _changed(pure) < 0.3
    mixed, dtypes = _update(tiny_qwen, chats, tmp_path / "bf16", "bfloat16", "bf16")
    assert _changed(ref) == 1.0 and _changed(mixed) > 0.99, (_changed(ref), _changed(mixed))
    rel = {k: float((mixed[k].norm() - ref[k].norm()).abs() / ref[k].norm()) for k in ref}
    assert max(rel.values()) < 0.1, rel
    total = (
        sum(float(u.norm()) ** 2 for u in mixed.values()) / sum(float(u.norm()) ** 2 for u in ref.values())
    ) ** 0.5
    assert total == pytest.approx(1.0, abs=0.05)
    assert dtypes == {torch.float32}


def test_lora_adapter_trains_in_float32_over_bf16_weights(tiny_qwen):
    """A LoRA fine-tune of a bfloat16 model: the adapter is float32, the frozen weights stay bfloat16."""
    lm = load_model(ModelSpec(str(tiny_qwen / "model"), dtype="bfloat16"))
    model = make_trainable(lm.model, FinetuneConfig(method="lora", lora_rank=2))
    dtypes = {p.requires_grad: set() for p in model.parameters()}
    for p in model.parameters():
        dtypes[p.requires_grad].add(p.dtype)
    assert dtypes == {True: {torch.float32}, False: {torch.bfloat16}}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reference_is_the_first_blocks_without_a_full_copy(tmp_path, dtype):
    """The frozen reference of a full fine-tune (SAE at block 1 of 6) holds blocks 0-1 only, in the
    model's dtype and device and in storage of its own, and gives exactly the model's residual at
    block 1 on a left-padded batch; building it allocates no more than what it holds (a deep copy
    of the model allocated all six blocks first)."""
    folder = make_tiny_qwen(tmp_path / "model", n_layers=6)
    model = load_model(ModelSpec(str(folder), dtype=dtype)).model
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ref = _reference(model, 1)
    allocated = sum(
        e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0 and not e.cpu_children
    )
    held = sum(t.numel() * t.element_size() for t in [*ref.parameters(), *ref.buffers()])
    whole = sum(t.numel() * t.element_size() for t in model.parameters())
    assert held < 0.5 * whole and allocated < 1.1 * held, (allocated, held, whole)

    assert len(ref.model.layers) == ref.config.num_hidden_layers == len(ref.config.layer_types) == 2
    assert isinstance(ref.lm_head, torch.nn.Identity) and not ref.training
    assert all(
        not p.requires_grad and p.dtype == getattr(torch, dtype) and p.device.type == "cpu"
        for p in ref.parameters()
    )
    live = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert live.isdisjoint(t.data_ptr() for t in [*ref.parameters(), *ref.buffers()])

    ids = torch.randint(3, model.config.vocab_size, (3, 9))
    attn = torch.ones_like(ids)
    attn[0, :4] = 0
    with torch.no_grad():
        want = capture_resid(model, [1], ids, attn)[1]
        got = capture_resid(ref, [1], ids, attn)[1]
    assert torch.equal(got, want)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(1.0)  # the reference keeps the base weights
    assert torch.equal(capture_resid(ref, [1], ids, attn)[1], want)


def test_full_finetune_penalty_starts_at_zero_under_bf16_autocast(tiny_qwen, chats, tmp_path):
    """At step 1 a full fine-tune is its frozen reference, so under bf16 autocast over float32
    masters, as in fp32, the BLOCK-EM penalty is exactly 0: the reference's forward and both SAE
    encodes run under the trained forward's precision (outside it: 3e-5)."""
    from helpers import make_random_sae

    from saediff.interventions.block_runs import BlockRunConfig, block_one
    from saediff.interventions.latent_sets import LatentSets
    from saediff.saes.loading import load_sae

    sae = load_sae(make_random_sae(tmp_path / "sae", 32, "blocks.0.hook_resid_post"))
    ft = FinetuneConfig(method="full", steps=2, batch_size=4, lr=1e-3, precision="bf16")
    cfg = BlockRunConfig(ft=ft, latents=LatentSets((1, 2, 3), (4,)), lam=1e4)
    res = block_one(
        ModelSpec(str(tiny_qwen / "model"), dtype="bfloat16"),
        chats,
        sae,
        0,
        cfg,
        tmp_path / "run",
        progress=False,
    )
    assert res["penalty_first"] == 0.0 and res["penalty_last"] > 0
