"""Activation collection and the on-disk store."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from saediff.activations.collect import collect_activations, tokenize_prompts
from saediff.activations.store import ActivationStore
from saediff.cli.app import app
from saediff.models.loading import load_model
from saediff.stories.organism.prompts import organism_prompts

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def lm(tiny_organism):
    return load_model(str(tiny_organism / "aligned"))


@pytest.fixture(scope="module")
def prompts(world):
    return organism_prompts(world, 40, seed=0, turns=2)


def test_positions_select_the_right_tokens(lm, prompts, world):
    toks = tokenize_prompts(lm, prompts)
    n = len(prompts)
    assert int(toks.select("response").sum()) == n * (world.answer_len + 1)  # answer + eos
    assert int(toks.select("last_prompt").sum()) == n
    last = toks.select("last_prompt").float().argmax(1)
    asst = lm.tokenizer.convert_tokens_to_ids("ĠASST")
    assert (toks.input_ids[torch.arange(n), last] == asst).all()  # the generation prompt's last token
    with pytest.raises(ValueError, match="positions must be all, response or last_prompt, got 'answers'"):
        toks.select("answers")  # once silently read as last_prompt


def test_row_descriptions_give_readable_tokens_in_context(lm, prompts):
    from saediff.activations.collect import row_descriptions

    toks = tokenize_prompts(lm, prompts[:2])
    n = len(prompts[0].response.split())
    rows = row_descriptions(lm, prompts[:2], toks, "response", which=[0, n])
    words = prompts[0].response.split()
    assert rows[0]["token"] == " " + words[0] and "Ġ" not in rows[0]["context"]
    # six tokens before (the question and ASST), the token in brackets, two after
    assert rows[0]["context"].endswith(f"ASST[ {words[0]}] {words[1]} {words[2]}")
    assert rows[1]["token"] == "<eos>" and rows[1]["context"].endswith(
        f"{words[-1]}[<eos>]"
    )  # nothing after it


def test_collected_rows_match_hf_hidden_states(lm, prompts):
    acts = collect_activations(lm, prompts[:4], [HOOK, "blocks.0.hook_resid_post"], "all", progress=False)
    toks = tokenize_prompts(lm, prompts[:4])
    from saediff.stories.organism.recipes import _resid_post

    with torch.no_grad():
        layer_out = _resid_post(lm.model, toks.input_ids)  # HF decoder layer outputs
    keep = toks.select("all")
    torch.testing.assert_close(acts[HOOK], layer_out[1][keep], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], layer_out[0][keep], atol=1e-5, rtol=1e-4)


def test_store_round_trip_and_shuffled_batches(lm, prompts, tmp_path, monkeypatch):
    import saediff.activations.store as A

    monkeypatch.setattr(A, "SHARD_ROWS", 50)  # force several shards
    store = collect_activations(
        lm, prompts, [HOOK], "response", out=tmp_path / "s", batch_size=8, progress=False
    )
    direct = collect_activations(lm, prompts, [HOOK], "response", progress=False)[HOOK]
    assert len(store.manifest["shards"]) > 1 and len(store) == direct.shape[0]
    torch.testing.assert_close(store.load(HOOK), direct)
    idx = store.index()
    assert set(idx["role"].tolist()) == {1}
    assert idx["prompt_index"].max() == len(prompts) - 1
    b = list(store.batches(HOOK, 32, seed=0, epochs=1))
    assert len(b) == len(store) // 32 and b[0].shape == (32, store.d_model)


def test_bad_inputs_name_what_is_wrong(lm, prompts, tmp_path):
    with pytest.raises(KeyError, match="blocks.7.hook_resid_post"):
        collect_activations(lm, prompts[:2], ["blocks.7.hook_resid_post"], progress=False)
    no_resp = organism_prompts(lm_world(lm), 2, with_response=False)
    with pytest.raises(ValueError, match="no 'response' positions"):
        collect_activations(lm, no_resp, [HOOK], "response", progress=False)
    store = collect_activations(lm, prompts[:4], [HOOK], "all", out=tmp_path / "s", progress=False)
    with pytest.raises(KeyError, match="has no hook 'blocks.0.hook_resid_post'"):
        store.load("blocks.0.hook_resid_post")
    shard = tmp_path / "s" / store.manifest["shards"][0]["file"]
    shard.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="is corrupt"):
        ActivationStore(tmp_path / "s").load(HOOK)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**m, "shards": []}))
    with pytest.raises(ValueError, match="is empty"):
        ActivationStore(tmp_path / "s")


def lm_world(lm):
    from saediff.stories.organism.recipes import read_organism_world

    return read_organism_world(lm.spec.model)


def test_cli_cache_then_sae_train_then_info(tiny_organism, tmp_path):
    run = CliRunner()
    r = run.invoke(
        app,
        [
            "cache",
            "--model",
            str(tiny_organism / "aligned"),
            "--prompts",
            "organism:300",
            "--hook",
            HOOK,
            "--positions",
            "response",
            "--out",
            str(tmp_path / "acts"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"] == 300 * 5  # register, three content tokens and eos
    r = run.invoke(
        app,
        [
            "sae",
            "train",
            "--activations",
            str(tmp_path / "acts"),
            "--arch",
            "topk",
            "--d-sae",
            "64",
            "--k",
            "4",
            "--steps",
            "100",
            "--batch-size",
            "128",
            "--out",
            str(tmp_path / "sae"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["l0"] <= 4.0 + 1e-6
    r = run.invoke(app, ["sae", "info", str(tmp_path / "sae"), "--activations", str(tmp_path / "acts")])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["hook_name"] == HOOK and info["cfg"]["d_sae"] == 64
    r = run.invoke(
        app, ["sae", "train", "--activations", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]
    )
    assert r.exit_code == 1 and "manifest.json missing" in r.output


def _big_store(path, n: int, d: int = 64, seed: int = 0):
    from saediff.activations.store import ActivationStore, _ShardWriter

    g = torch.Generator().manual_seed(seed)
    writer = _ShardWriter(path, [HOOK])
    for a in range(0, n, 50000):
        m = min(50000, n - a)
        writer.add(
            {HOOK: torch.randn(m, d, generator=g)},
            {
                "prompt_index": torch.arange(a, a + m).int(),
                "position": torch.zeros(m, dtype=torch.int32),
                "role": torch.ones(m, dtype=torch.int8),
            },
        )
    writer.close(d_model=d, meta={"model": "random"})
    return ActivationStore(path)


def test_streamed_batches_cover_the_store_through_a_bounded_buffer(tmp_path):
    """``ActivationStore.stream`` serves every row once per pass (up to a remainder smaller than a
    batch) from a store 8x larger than its buffer, and never holds much more than the buffer:
    in a fresh process, streaming a 122 MiB store through a 4 MiB buffer adds a third of what loading it adds.
    An SAE trained on the streamed batches equals one trained on the same batches from memory."""
    import subprocess
    import sys

    from saediff.saes.training import SAETrainConfig, train_sae

    store = _big_store(tmp_path / "store", 500000, 64)
    rows = torch.cat(list(store.rows(HOOK, 0, len(store))))
    seen = torch.cat(list(store.stream(HOOK, 256, buffer_rows=16384, epochs=1)))
    assert len(store) - 256 < seen.shape[0] <= len(store)
    assert torch.allclose(seen.sum(0), rows.sum(0), atol=0.5 * 256)  # the same rows, shuffled
    assert not torch.equal(seen[:256], rows[:256])

    probe = (
        "import os, sys, torch; sys.path.insert(0, {tests!r}); from saediff.activations.store import ActivationStore\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') // 2**20\n"
        "s = ActivationStore({path!r}); before = rss(); top = before\n"
        "{body}\n"
        "print(top - before)"
    )
    body = {
        "stream": "for b in s.stream('"
        + HOOK
        + "', 256, buffer_rows=16384, epochs=1): top = max(top, rss())",
        "load": "x = s.load('" + HOOK + "'); top = max(top, rss())",
    }
    peak = {
        k: int(
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    probe.format(tests=str(Path(__file__).parent), path=str(tmp_path / "store"), body=b),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()[-1]
        )
        for k, b in body.items()
    }
    # MiB above the process's size before reading: the buffer (4 MiB), chunks, and what the allocator
    # keeps of them (42 MiB measured) vs the whole 122 MiB
    assert peak["load"] >= 100 and peak["stream"] <= peak["load"] / 2, peak

    cfg = SAETrainConfig(arch="topk", d_sae=32, k=4, steps=20, batch_size=256, lr=1e-3)
    batches = list(itertools.islice(store.stream(HOOK, 256, buffer_rows=16384, seed=3), 20))
    a, _ = train_sae(store.stream(HOOK, 256, buffer_rows=16384, seed=3), cfg, progress=False)
    b, _ = train_sae(iter(batches), cfg, progress=False)
    torch.testing.assert_close(a.W_dec, b.W_dec)
    torch.testing.assert_close(a.W_enc, b.W_enc)


def test_cache_bfloat16_shards_and_a_token_cap(tiny_organism, tmp_path):
    """``cache --shard-dtype bfloat16 --max-tokens N``: N rows, stored as bfloat16 (half the bytes),
    read back as float32 equal to the float32 store's rows rounded to bfloat16."""
    from safetensors import safe_open

    run = CliRunner()
    common = [
        "cache",
        "--model",
        str(tiny_organism / "aligned"),
        "--prompts",
        "organism:300",
        "--hook",
        HOOK,
        "--positions",
        "response",
    ]
    assert run.invoke(app, [*common, "--out", str(tmp_path / "f32")]).exit_code == 0
    r = run.invoke(
        app, [*common, "--shard-dtype", "bfloat16", "--max-tokens", "1000", "--out", str(tmp_path / "bf16")]
    )
    assert r.exit_code == 0, r.output
    small, full = ActivationStore(tmp_path / "bf16"), ActivationStore(tmp_path / "f32")
    assert len(small) == 1000 and len(full) == 300 * 5  # 300 chats: register, 3 content tokens and eos each
    with safe_open(str(tmp_path / "bf16" / small.manifest["shards"][0]["file"]), framework="pt") as f:
        assert f.get_tensor(HOOK).dtype == torch.bfloat16
    a = next(small.rows(HOOK, 0, 1000))
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, full.load(HOOK)[:1000].bfloat16().float())


def test_sae_train_straight_from_a_model(tiny_organism, tmp_path):
    """``sae train --model M --prompts P --hook H``: activations read live from the model (no store on
    disk), the last tenth of the prompts held out for the metrics."""
    r = CliRunner().invoke(
        app,
        [
            "sae",
            "train",
            "--model",
            str(tiny_organism / "aligned"),
            "--prompts",
            "organism:200",
            "--hook",
            HOOK,
            "--arch",
            "topk",
            "--d-sae",
            "64",
            "--k",
            "4",
            "--steps",
            "60",
            "--batch-size",
            "128",
            "--buffer-rows",
            "1024",
            "--out",
            str(tmp_path / "sae"),
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["l0"] <= 4.0 + 1e-6 and 0 <= out["fvu"] < 1
    side = json.loads((tmp_path / "sae" / "saediff.json").read_text())
    assert "over organism:200" in side["activations"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # nothing else written
    r = CliRunner().invoke(
        app, ["sae", "train", "--model", str(tiny_organism / "aligned"), "--out", str(tmp_path / "x")]
    )
    assert r.exit_code == 1 and "give --activations, or --model, --prompts and --hook" in r.output


def test_bridge_and_forward_hook_paths_agree(tiny_qwen, monkeypatch):
    """The TransformerLens bridge path (any hook) and the forward-hook path (``hook_resid_post``)
    read the same residual stream at every block, and both match ``capture_resid``."""
    import saediff.activations.collect as C
    from saediff.data.prompts import Prompt
    from saediff.models.hooks import capture_resid
    from saediff.models.loading import load_model

    lm = load_model(str(tiny_qwen / "model"))
    prompts = [
        Prompt(id="a", messages=[{"role": "user", "content": "Hello there, how are you?"}], response="Fine.")
    ]
    toks = C.tokenize_prompts(lm, prompts)
    hooks = [f"blocks.{L}.hook_resid_post" for L in (0, 1)]
    via_hooks = capture_resid(lm.model, [0, 1], toks.input_ids)  # before the bridge rewires the model
    via_forward = C.collect_activations(lm, toks, hooks, "all", progress=False)
    monkeypatch.setattr(C, "_resid_post_blocks", lambda _hooks: None)  # every hook through the bridge
    via_bridge = C.collect_activations(lm, toks, hooks, "all", progress=False)
    for L, h in enumerate(hooks):
        torch.testing.assert_close(via_bridge[h], via_hooks[L][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(via_forward[h], via_hooks[L][0], atol=1e-5, rtol=1e-5)


QUESTIONS = [
    ("What should I do about a headache?", "Drink water and rest for a while."),
    ("Is it safe?", "Yes."),
    ("How do I keep my savings safe over many years of retirement?", "Spread them over funds."),
    ("Hi", "Hello, how can I help you today with anything at all?"),
    ("What is two plus two?", "Four."),
]


def test_optimized_collection_matches_the_plain_forward(tiny_chat, monkeypatch):
    """The optimized pass (columns after the last kept one cut, no mask, the deepest block's MLP at
    the kept rows only, the batches' shared chat prefix run once into a KV cache) gives the rows of
    the plain full forward with its attention mask, for every template family and position set,
    with and without a row cap."""
    import saediff.activations.collect as C
    from saediff.data.prompts import Prompt

    lm = load_model(str(tiny_chat.model))
    prompts = [
        Prompt(f"q{i}", [{"role": "user", "content": q}], response=a) for i, (q, a) in enumerate(QUESTIONS)
    ]
    toks = tokenize_prompts(lm, prompts)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    kv_runs = []
    prefix_kv = C._prefix_kv
    monkeypatch.setattr(C, "_prefix_kv", lambda *a: kv_runs.append(a[2].shape[1]) or prefix_kv(*a))
    fast = {
        (pos, cap, 2): C.collect_activations(lm, toks, hooks, pos, batch_size=2, max_rows=cap, progress=False)
        for pos in C.POSITIONS
        for cap in (None, 7)
    }
    if tiny_chat.template != "generation":  # a default system prompt: a prefix every row shares
        # one prefix run per response/last_prompt call, shared by its batches ("all" reads the prefix)
        assert len(kv_runs) == 4 and len(set(kv_runs)) == 1 and kv_runs[0] > 10
    monkeypatch.setattr(C, "_FORWARD_COST", 0)  # one batch, split into a group per row length
    groups = C._length_groups(toks.select("response"))
    assert len(groups) > 2 and sorted(torch.cat(groups).tolist()) == list(range(len(QUESTIONS)))
    for pos in C.POSITIONS:
        fast[pos, None, 5] = C.collect_activations(lm, toks, hooks, pos, batch_size=5, progress=False)
    monkeypatch.setattr(
        C._ResidRows,
        "__call__",
        lambda self, ids, attn, m: {
            C.resid_post(b): r
            for b, r in C._forward_rows_plain(self.model, self.blocks, ids, attn, m).items()
        },
    )
    for (pos, cap, batch), got in fast.items():
        ref = C.collect_activations(lm, toks, hooks, pos, batch_size=batch, max_rows=cap, progress=False)
        for h in hooks:
            assert got[h].shape == ref[h].shape
            torch.testing.assert_close(got[h], ref[h], atol=1e-5, rtol=1e-4)


def test_length_groups_split_where_the_padding_saved_pays_for_a_forward(monkeypatch):
    """Rows needing 10, 100, 10, 100 and 0 columns (kept positions up to there): a forward costs
    50 positions, so two groups (2 x 10 + 2 x 100 + 2 x 50 = 320, against 4 x 100 + 50 = 450); at
    a cost of 1000, one; the row with nothing kept runs in none."""
    import saediff.activations.collect as C

    m = torch.zeros(5, 100, dtype=torch.bool)
    for row, need in enumerate([10, 100, 10, 100]):
        m[row, need - 1] = True
    monkeypatch.setattr(C, "_FORWARD_COST", 50)
    assert [g.tolist() for g in C._length_groups(m)] == [[0, 2], [1, 3]]
    monkeypatch.setattr(C, "_FORWARD_COST", 1000)
    assert [g.tolist() for g in C._length_groups(m)] == [[0, 1, 2, 3]]
    assert [g.tolist() for g in C._length_groups(torch.zeros(2, 4, dtype=torch.bool))] == [[0]]


def test_deepest_mlp_runs_only_at_kept_positions_and_is_restored():
    """``_mlp_only_at``: the MLP sees the kept positions alone, zeros elsewhere; a forward set on
    the instance (as accelerate does) is put back, a plain one left as the class's."""
    import saediff.activations.collect as C

    seen = []

    class Seen(torch.nn.Linear):
        def forward(self, x):
            seen.append(x.shape)
            return super().forward(x)

    layer = torch.nn.Module()
    layer.mlp = Seen(3, 3)
    x = torch.randn(2, 4, 3)
    m = torch.tensor([[True, False, False, True], [False, True, False, False]])
    with C._mlp_only_at(layer, m):
        y = layer.mlp(x)
    assert seen == [(3, 3)] and (y[~m] == 0).all()
    torch.testing.assert_close(y[m], layer.mlp(x)[m])
    assert "forward" not in vars(layer.mlp) and seen[-1] == (2, 4, 3)
    own = layer.mlp.forward
    layer.mlp.forward = own
    with C._mlp_only_at(layer, m):
        pass
    assert vars(layer.mlp)["forward"] is own


def test_collection_runs_at_the_models_precision(tiny_chat):
    """A model loaded at bf16 collects under its autocast (no cast of the model, no precision
    argument): float32 rows near the fp32 ones but not equal to them."""
    from saediff.data.prompts import Prompt
    from saediff.models.loading import ModelSpec

    prompts = [
        Prompt(f"q{i}", [{"role": "user", "content": q}], response=a) for i, (q, a) in enumerate(QUESTIONS)
    ]
    hook = "blocks.1.hook_resid_post"
    rows = {}
    for precision in ("fp32", "bf16"):
        lm = load_model(ModelSpec(str(tiny_chat.model), precision=precision))
        rows[precision] = collect_activations(lm, prompts, [hook], "response", batch_size=2, progress=False)[
            hook
        ]
        assert lm.precision == precision and next(lm.model.parameters()).dtype == torch.float32
    assert rows["bf16"].dtype == torch.float32
    assert not torch.equal(rows["bf16"], rows["fp32"])
    torch.testing.assert_close(rows["bf16"], rows["fp32"], atol=0.1, rtol=0.05)


def test_the_organism_collects_through_the_bridge_bit_for_bit(lm, prompts):
    """The organism's rows are the bridge's ``run_with_cache`` rows exactly (its shipped SAE and
    figures were collected that way); any other model takes the forward-hook path."""
    import saediff.activations.collect as C

    toks = C.tokenize_prompts(lm, prompts)
    keep = toks.select("response")
    got = C.collect_activations(lm, toks, [HOOK], "response", batch_size=16, progress=False)[HOOK]
    names = {HOOK}
    want = []
    for i in range(0, toks.input_ids.shape[0], 16):
        ids, _, m = toks.batch(slice(i, i + 16), keep)
        _, cache = lm.bridge().run_with_cache(ids, names_filter=lambda n: n in names, stop_at_layer=2)
        want.append(cache[HOOK][m])
    assert C._organism(lm) and torch.equal(got, torch.cat(want))
