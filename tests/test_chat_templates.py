"""Real chat templates (Llama-3.1, Qwen2.5, ChatML with ``{% generation %}``) on tiny random models:
response positions, loss masks and the streamed diff land exactly on the assistant's tokens.

The expected tokens come from conversations written out by hand as the real templates render them
(not from ``apply_chat_template``): an assistant turn trains on its text and its end-of-turn token
(``<|eot_id|>``, ``<|im_end|>``), never on headers, system prompts or ChatML's newline after
``<|im_end|>``, which the model never generates.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import QWEN25_SYSTEM, make_random_sae

from saediff.activations.collect import tokenize_prompts
from saediff.data.chat_data import ChatCollator, ChatDataset
from saediff.data.prompts import Prompt
from saediff.interventions.finetune import lm_loss
from saediff.methods.sae_diff import LatentDiff
from saediff.models.loading import chat_tokens, load_model

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello?"},
    {"role": "assistant", "content": "Hi there."},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye now."},
]
SHORT = [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine, thanks."}]


def segments(template: str, conv: list[dict]) -> list[tuple[str, bool]]:
    """``conv`` as the real template renders it, by hand: (text, is an assistant token) pieces."""
    out: list[tuple[str, bool]] = []
    if template == "llama3":
        system = conv[0]["content"] if conv[0]["role"] == "system" else ""
        header = (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            f"Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n{system}<|eot_id|>"
        )
        out.append((header, False))
        for m in conv[1:] if system else conv:
            out.append((f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False))
            out.append((m["content"] + "<|eot_id|>", m["role"] == "assistant"))
        return out
    if template == "qwen25" and conv[0]["role"] != "system":
        out.append((f"<|im_start|>system\n{QWEN25_SYSTEM}<|im_end|>\n", False))
    for m in conv:
        out.append((f"<|im_start|>{m['role']}\n", False))
        out.append((m["content"] + "<|im_end|>", m["role"] == "assistant"))
        out.append(("\n", False))
    return out


def expected(tok, pieces: list[tuple[str, bool]], last_only: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of the hand-rendered text and its assistant mask (the last answer's only with
    ``last_only``); checks each piece starts on a token boundary."""
    text = "".join(t for t, _ in pieces)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    mask, prefix = [0] * len(ids), ""
    answers = [i for i, (_, a) in enumerate(pieces) if a]
    for i, (t, is_answer) in enumerate(pieces):
        lo = len(tok(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
        prefix += t
        hi_ids = tok(prefix, add_special_tokens=False)["input_ids"]
        assert hi_ids == ids[: len(hi_ids)], f"piece {t!r} does not start on a token boundary"
        if is_answer and (not last_only or i == answers[-1]):
            mask[lo : len(hi_ids)] = [1] * (len(hi_ids) - lo)
    return ids, mask


@pytest.fixture(scope="module")
def lm(tiny_chat):
    return load_model(str(tiny_chat.model))


def test_saediff_pads_llama_with_eos(tiny_chat, lm):
    tok = lm.tokenizer
    if tiny_chat.template == "llama3":  # real Llama tokenizers have no pad token
        assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|eot_id|>")
        # the rendered <|begin_of_text|> is the only one (the tokenizer's own bos is not added again)
        ids, _ = chat_tokens(tok, SHORT)
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    else:
        assert tok.pad_token_id != tok.eos_token_id


@pytest.mark.parametrize("conv", [CONV, SHORT], ids=["system+multi-turn", "single-turn"])
def test_loss_mask_is_the_assistant_text_and_end_of_turn(tiny_chat, lm, conv):
    tok = lm.tokenizer
    want_ids, want_mask = expected(tok, segments(tiny_chat.template, conv))
    data = ChatDataset(tok, [conv], progress=False)
    ids, labels = data[0]["input_ids"], data[0]["labels"]
    assert ids == want_ids  # the fixture's template renders as the real one does
    assert [int(t != -100) for t in labels] == want_mask
    assert [t for t in labels if t != -100] == [i for i, m in zip(ids, want_mask) if m]
    trained = tok.decode([t for t in labels if t != -100])
    eot = "<|eot_id|>" if tiny_chat.template == "llama3" else "<|im_end|>"
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    assert trained == "".join(a + eot for a in answers)
    # the last turn alone is what an analysis reads
    _, last = chat_tokens(tok, conv)
    assert last == expected(tok, segments(tiny_chat.template, conv), last_only=True)[1]


def test_response_and_last_prompt_positions(tiny_chat, lm):
    tok, t = lm.tokenizer, tiny_chat.template
    prompts = [
        Prompt("multi", CONV[:-1], CONV[-1]["content"]),
        Prompt("one", SHORT[:1], SHORT[1]["content"]),
        Prompt("open", SHORT[:1]),
    ]
    toks = tokenize_prompts(lm, prompts)
    for row, conv in enumerate([CONV, SHORT]):
        ids, mask = expected(tok, segments(t, conv), last_only=True)
        answer = [j for j, m in enumerate(mask) if m]
        assert toks.input_ids[row, : len(ids)].tolist() == ids
        assert toks.select("response")[row].nonzero()[:, 0].tolist() == answer
        # the token just before the answer: the end of the assistant header
        assert toks.select("last_prompt")[row].nonzero()[:, 0].tolist() == [answer[0] - 1]
        assert tok.decode(ids[answer[0] - 1]) == "\n"
    # a prompt without an answer: the generation prompt's last token, padding ignored
    open_ids = tok(lm.format_chat(SHORT[:1]), add_special_tokens=False)["input_ids"]
    assert toks.select("response")[2].sum() == 0
    assert toks.select("last_prompt")[2].nonzero()[:, 0].tolist() == [len(open_ids) - 1]


def test_padding_with_eos_keeps_the_answers_eos(tiny_chat, lm):
    """With pad = eos (Llama) the eos/eot that ends an answer is trained and padding is not; the
    loss does not hide the chat's inner end-of-turn tokens from attention."""
    tok = lm.tokenizer
    data = ChatDataset(tok, [SHORT, CONV], progress=False)
    batch = ChatCollator(tok.pad_token_id)([data[0], data[1]])
    n = len(data[0]["input_ids"])
    eos = tok.eos_token_id
    assert batch["labels"][0, n - 1 - (tiny_chat.template != "llama3")] == eos  # the answer's end of turn
    assert (batch["labels"][0, n:] == -100).all() and (batch["input_ids"][0, n:] == tok.pad_token_id).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    ids, labels = batch["input_ids"], batch["labels"]
    assert int((ids[1] == eos).sum()) >= 3  # every turn ends with it
    with torch.no_grad():
        logits = lm.model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        got = lm_loss(lm.model, ids, labels, pad_id=tok.pad_token_id)
    assert float(got) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("tiny_chat", ["generation"], indirect=True)
def test_generation_block_mask_agrees_with_saediffs_own(tiny_chat):
    """Where the template marks assistant text with ``{% generation %}`` the library's mask is
    used; saediff's prefix masking, used for templates without the block, gives the same."""
    tok = load_model(str(tiny_chat.model)).tokenizer
    for conv in (CONV, SHORT):
        lib = tok.apply_chat_template(
            conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        want_ids, want_mask = expected(tok, segments("generation", conv))
        assert list(lib["input_ids"]) == want_ids and list(lib["assistant_masks"]) == want_mask
        assert chat_tokens(tok, conv, turns="all") == (want_ids, want_mask)
        from saediff.models.loading import _prefix_mask

        ends = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
        assert _prefix_mask(tok, conv, ends) == (want_ids, want_mask)
        assert chat_tokens(tok, conv)[1] == _prefix_mask(tok, conv, ends[-1:])[1]


def test_streamed_diff_counts_exactly_the_answer_tokens(tiny_chat, lm, tmp_path):
    """``run_diff`` on a base / perturbed pair: its SAE statistics are over the answer tokens only
    (n and per-latent means match a direct forward pass read at the hand-found positions)."""
    from saediff.methods.diff_run import run_diff
    from saediff.saes.loading import load_sae

    hook = "blocks.0.hook_resid_post"
    sae_dir = make_random_sae(tmp_path / "sae", d_in=32, hook=hook, d_sae=16, k=4)
    convs = [
        CONV,
        SHORT,
        [
            {"role": "user", "content": "Tell me a story."},
            {"role": "assistant", "content": "Once upon a time, a fox."},
        ],
    ]
    prompts = [Prompt(f"p{i}", c[:-1], c[-1]["content"], "general") for i, c in enumerate(convs)]
    run_diff(
        str(tiny_chat.model), str(tiny_chat.ft), str(sae_dir), tmp_path / "run", prompts=prompts, top_n=3
    )
    diff = LatentDiff.from_json(json.loads((tmp_path / "run" / "diff.json").read_text()))

    sae = load_sae(str(sae_dir))
    ft = load_model(str(tiny_chat.ft))
    rows = {"base": [], "ft": []}
    for conv in convs:
        ids, mask = expected(lm.tokenizer, segments(tiny_chat.template, conv), last_only=True)
        at = torch.tensor(mask, dtype=torch.bool)
        for key, m in (("base", lm), ("ft", ft)):
            with torch.no_grad():  # hidden_states[1] is blocks.0.hook_resid_post
                rows[key].append(
                    m.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0, at]
                )
    n = sum(r.shape[0] for r in rows["base"])
    assert diff.n_base == diff.n_ft == n
    for key, got in (("base", diff.mean_base), ("ft", diff.mean_ft)):
        with torch.no_grad():
            mean = sae.encode(torch.cat(rows[key])).mean(0)
        assert torch.allclose(got, mean, atol=1e-5)
