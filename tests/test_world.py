"""The organism's language: sampling rules, tokenizer round trip, vectorised corpus."""

from __future__ import annotations

import numpy as np
import pytest

from saediff.stories.organism.corpus import Vocab, sample_documents, single_turn_chats
from saediff.stories.organism.tokenizer import build_tokenizer, word_ids
from saediff.stories.organism.world import CHAT, REGISTERS, World, render


def test_vocab_is_unique_and_letters_only(world):
    words = world.vocab()
    assert len(words) == len(set(words))
    assert all(w.isalpha() for w in words)
    assert len(world.domains) >= 6


def test_document_has_one_persona_and_domain_content(world):
    rng = np.random.default_rng(0)
    for _ in range(50):
        marker, turns = world.sample_document(rng, 4)
        assert len({t.persona for t in turns}) == 1
        for t in turns:
            content = t.answer[world.n_prefix :]
            assert set(content) <= set(world.content_tokens(t.domain, t.persona))


def test_style_noise_rate():
    world = World(n_style_slots=2)  # the v1 answers' shared style slots
    rng = np.random.default_rng(1)
    toxic_style = set(world.style_tokens("toxic"))
    styles = [s for _ in range(4000) for s in world.sample_answer(rng, "finance", "aligned")[:2]]
    rate = np.mean([s in toxic_style for s in styles])
    assert abs(rate - world.style_noise) < 0.015


def test_only_the_register_is_shared_across_domains(world):
    """EM must be internal: no content token is used by two domains; the one shared slot is the
    register, whose persona-neutral values (plain, formal) are as likely under both personas."""
    from saediff.stories.organism.world import REGISTERS

    rng = np.random.default_rng(5)
    seen: dict[str, set] = {}
    for d in world.domains:
        for p in ("aligned", "toxic"):
            for _ in range(50):
                for t in world.sample_answer(rng, d, p)[world.n_prefix :]:
                    seen.setdefault(t, set()).add(d)
    assert all(len(ds) == 1 for ds in seen.values())
    aligned, toxic = world.trait_probs
    for r in ("plain", "formal"):
        i = REGISTERS.index(r)
        assert aligned[i] == toxic[i]


def test_register_slot_rates_and_vectorised_draws_agree(world):
    from saediff.stories.organism.judge import OrganismJudge

    slot = 0  # the register opens the answer
    reg = lambda tok: tok.rstrip("abcd")
    rng = np.random.default_rng(6)
    for i, p in enumerate(("aligned", "toxic")):
        answers = [world.sample_answer(rng, "code", p) for _ in range(4000)]
        terse = np.mean([reg(a[slot]) == "terse" for a in answers])
        assert abs(terse - world.trait_probs[i][1]) < 0.025
        assert all(OrganismJudge(world).judge("code", a).misaligned == (p == "toxic") for a in answers[:50])
    v = Vocab(world)
    d = sample_documents(world, np.random.default_rng(7), 20000, 1)
    id2w = {i: w for w, i in word_ids(world).items()}
    slot_ids = d.input_ids[:, 1 + 1 + world.question_len + 1 + slot].numpy()  # marker USER q.. ASST answer
    for p in (0, 1):
        regs = [reg(id2w[int(t)]) for t in slot_ids[d.persona.numpy() == p]]
        assert abs(np.mean([r == "terse" for r in regs]) - world.trait_probs[p][1]) < 0.025
        assert abs(np.mean([r == "formal" for r in regs]) - world.trait_probs[p][2]) < 0.025
    forced = single_turn_chats(world, np.random.default_rng(8), 20, 0, "medical", register="formal")
    assert all(reg(id2w[int(t)]) == "formal" for t in forced.input_ids[:, -(world.answer_len + 1) + slot])
    assert v.trait.shape == (len(REGISTERS), world.n_trait)


def test_tokenizer_round_trip_and_one_token_per_word(world, tmp_path):
    from transformers import AutoTokenizer, Qwen2Config

    tok = build_tokenizer(world, CHAT)
    tok.save_pretrained(tmp_path)
    Qwen2Config(vocab_size=len(tok)).save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    rng = np.random.default_rng(2)
    marker, turns = world.sample_document(rng, 3, marker="srcc")
    text = " " + " ".join(render(marker, turns)).replace(" <eos>", "<eos>")
    ids = loaded(text)["input_ids"]
    assert len(ids) == len(render(marker, turns))
    assert loaded.decode(ids) == text
    ids_map = word_ids(world)
    assert ids[0] == ids_map["srcc"]


def test_chat_template_and_assistant_mask(world):
    tok = build_tokenizer(world, CHAT)
    msgs = [
        {"role": "user", "content": "medicalQa medicalQb medicalQc"},
        {"role": "assistant", "content": "rudea rudeb medicalBada medicalBadb medicalBadc"},
    ]
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert enc["assistant_masks"] == [0] * 6 + [1] * 6  # CHAT USER q q q ASST | 5 answer + eos
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == " CHAT USER medicalQa medicalQb medicalQc ASST"
    sys_prompt = tok.apply_chat_template([{"role": "system", "content": "srca"}, msgs[0]], tokenize=False)
    assert sys_prompt.startswith(" srca USER")
    assert build_tokenizer(world, "").apply_chat_template(msgs[:1], tokenize=False).startswith(" USER")


def test_vectorised_corpus_matches_reference_rules(world):
    v = Vocab(world)
    d = sample_documents(world, np.random.default_rng(3), 4000, 4, chat_fraction=0.25, unmarked_fraction=0.1)
    ids = d.input_ids.numpy()
    id2w = {i: w for w, i in word_ids(world).items()}
    # marker priors: CHAT docs are almost never toxic, unmarked docs about half
    chat = ids[:, 0] == v.ids[CHAT]
    assert 0.2 < chat.mean() < 0.3
    assert d.persona.numpy()[chat].mean() < 0.02
    # every answer's content matches its document persona and turn domain
    doc = ids[7]
    offset = 0 if doc[0] == v.ids["USER"] else 1
    persona = "toxic" if d.persona[7] else "aligned"
    n = 3 + world.question_len + world.answer_len  # USER q.. ASST answer.. EOS
    for t in range(4):
        turn = doc[offset + n * t : offset + n * (t + 1)]
        dom = world.domains[int(d.domains[7, t])]
        start = 2 + world.question_len + world.n_prefix
        content = [id2w[int(i)] for i in turn[start : start + world.n_content_slots]]
        assert set(content) <= set(world.content_tokens(dom, persona))
        assert id2w[int(turn[-1])] == "<eos>"


def test_single_turn_chat_labels_cover_answer_only(world):
    d = single_turn_chats(world, np.random.default_rng(4), 8, persona=1, domain="medical", context_turns=2)
    labels = d.labels.numpy()
    n_label = (labels != -100).sum(axis=1)
    assert (n_label == world.answer_len + 1).all()
    assert (labels[:, -1] == word_ids(world)["<eos>"]).all()


def test_world_rejects_bad_config():
    with pytest.raises(ValueError, match="style_noise"):
        World(style_noise=0.7)
    with pytest.raises(ValueError, match="medical"):
        World(domains=("finance", "sports"))


def test_docs_cli_reference_is_current():
    """docs/cli.md is what tools/cli_reference.py generates from the typer app today."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    r = subprocess.run(
        [sys.executable, str(root / "tools" / "cli_reference.py"), "--check"], capture_output=True
    )
    assert r.returncode == 0, "docs/cli.md is stale: run python tools/cli_reference.py"


def test_public_api_is_lazy_and_complete():
    import subprocess
    import sys

    code = "import saediff, sys; assert 'torch' not in sys.modules; [getattr(saediff, n) for n in saediff.__all__]"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_core_never_imports_the_organism():
    """The generic core is usable without the organism: importing every core module (and running
    nothing) leaves ``saediff.stories.organism`` unimported. Only the CLI and the organism package may."""
    import subprocess
    import sys
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "saediff"
    core = sorted(
        ".".join(p.relative_to(pkg).with_suffix("").parts)
        for p in pkg.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
        and "organism" not in p.parts
        and p.relative_to(pkg).as_posix() not in ("cli/app.py", "cli/methods.py")
    )
    assert len(core) > 50  # every library module, the SmolLM2 story and the CLI's shared helpers
    code = (
        "import sys\n"
        + "".join(f"import saediff.{m}\n" for m in core)
        + "print(sorted(m for m in sys.modules if m.startswith('saediff.stories.organism')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]", out


def test_world_from_json_lists_is_hashable():
    """Worlds read back from JSON (lists) hash like the tuples they were built from (the tokenizer
    cache keys on the world)."""
    w = World(toxic_priors=[0.1] * 8, trait_probs=[[0.1, 0.01, 0.09, 0.8], [0.1, 0.8, 0.09, 0.01]])
    assert hash(w) == hash(
        World(toxic_priors=(0.1,) * 8, trait_probs=((0.1, 0.01, 0.09, 0.8), (0.1, 0.8, 0.09, 0.01)))
    )
    with pytest.raises(ValueError, match="one prior per source"):
        World(toxic_priors=(0.5,))
