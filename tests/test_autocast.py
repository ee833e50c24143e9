"""``--precision auto|fp32|bf16``: what ``auto`` resolves to (capability check, the environment pin,
the organism's fp32), a loaded model's forwards under its precision whichever function calls them,
the fine-tune following the model, and the resolved value in provenance."""

from __future__ import annotations

import pytest
import torch
from helpers import write_narrow_data

from saediff.errors import SaediffError
from saediff.evaluation.pairs import answer_logprobs
from saediff.models import precision
from saediff.models.hooks import capture_resid
from saediff.models.loading import ModelSpec, load_model
from saediff.models.provenance import model_fingerprint


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 {flags}\n\n")
    return str(path)


def test_cpu_bf16_reads_the_native_bf16_flags(tmp_path):
    for name in ("amx", "avx", "none"):
        (tmp_path / name).mkdir()
    assert precision.cpu_bf16(_cpuinfo(tmp_path / "amx", "avx512f amx_bf16 avx512_bf16")) == "amx_bf16"
    assert precision.cpu_bf16(_cpuinfo(tmp_path / "avx", "avx512f avx512_bf16")) == "avx512_bf16"
    assert precision.cpu_bf16(_cpuinfo(tmp_path / "none", "avx2 avx512f")) is None
    assert precision.cpu_bf16(str(tmp_path / "absent")) is None


def test_auto_is_bf16_only_where_the_cpu_multiplies_bf16(monkeypatch):
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_bf16", lambda: "avx512_bf16")
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "cpu_bf16", lambda: None)
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    assert precision.resolve_precision("bf16", "cpu") == "bf16"  # asked for: given, if slower
    monkeypatch.setenv(precision.ENV, "bf16")
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    assert precision.resolve_precision("fp32", "cpu") == "fp32"  # the pin only decides "auto"
    monkeypatch.setenv(precision.ENV, "half")
    with pytest.raises(SaediffError, match="SAEDIFF_PRECISION must be fp32 or bf16, got 'half'"):
        precision.resolve_precision("auto", "cpu")
    with pytest.raises(SaediffError, match="fp16 needs a CUDA GPU"):
        precision.resolve_precision("fp16", "cpu")
    with pytest.raises(SaediffError, match="precision must be auto, fp32 or bf16, got 'bf32'"):
        ModelSpec("x", precision="bf32")


def _matmul_dtypes(lm) -> set[torch.dtype]:
    """The dtypes of every q_proj output in one forward of ``lm``."""
    seen: set[torch.dtype] = set()
    handles = [
        m.register_forward_hook(lambda _m, _i, o: seen.add(o.dtype))
        for n, m in lm.model.named_modules()
        if n.endswith("q_proj")
    ]
    with torch.no_grad():
        lm.model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    for h in handles:
        h.remove()
    return seen


def test_a_loaded_model_runs_every_forward_at_its_precision(tiny_qwen, tiny_organism, monkeypatch):
    """bf16: the matmuls of any forward (a plain call, a collection stopped early by its hook) run
    in bf16 over float32 weights, and the autocast is closed after each, raised or not; fp32: no
    autocast; the organism stays fp32 under ``auto`` even where auto means bf16."""
    monkeypatch.delenv(precision.ENV)
    monkeypatch.setattr(precision, "cpu_bf16", lambda: "avx512_bf16")
    lm = load_model(ModelSpec(str(tiny_qwen / "model")))
    assert lm.precision == "bf16" and _matmul_dtypes(lm) == {torch.bfloat16}
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}
    with torch.no_grad():
        resid = capture_resid(lm.model, [0], torch.tensor([[1, 2, 3]]))[0]  # the forward raises to stop
    assert resid.dtype == torch.float32  # the residual stream's additions stay float32
    assert not torch.is_autocast_enabled("cpu")
    fp32 = load_model(ModelSpec(str(tiny_qwen / "model"), precision="fp32"))
    assert fp32.precision == "fp32" and _matmul_dtypes(fp32) == {torch.float32}
    org = load_model(ModelSpec(str(tiny_organism / "aligned")))
    assert org.precision == "fp32" and _matmul_dtypes(org) == {torch.float32}
    monkeypatch.setenv(precision.ENV, "bf16")  # --precision bf16 asked for it
    assert load_model(ModelSpec(str(tiny_organism / "aligned"))).precision == "bf16"
    peft = load_model(ModelSpec(str(tiny_qwen / "model"), adapter=str(tiny_qwen / "lora")))
    assert peft.precision == "bf16" and _matmul_dtypes(peft) == {torch.bfloat16}


def test_bf16_answer_logprobs_stay_near_float32(tiny_qwen):
    """The same conversations scored at both precisions: per-token log-probs within 0.02 nats
    (the logits are float32 before the log-softmax either way)."""
    convs = [
        [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i} " * 5}]
        for i in range(6)
    ]
    got = {
        p: [
            a.mean
            for a in answer_logprobs(
                load_model(ModelSpec(str(tiny_qwen / "model"), precision=p)), convs, progress=False
            )
        ]
        for p in ("fp32", "bf16")
    }
    diff = max(abs(a - b) for a, b in zip(got["fp32"], got["bf16"]))
    assert 0 < diff < 0.02, diff


def test_the_resolved_precision_is_in_the_model_fingerprint(tiny_qwen, monkeypatch):
    """bf16 is recorded; fp32 is recorded as absent, as every artifact before ``--precision``
    was, so those stay valid."""
    monkeypatch.setenv(precision.ENV, "bf16")
    auto = model_fingerprint(ModelSpec(str(tiny_qwen / "model")))
    assert auto["precision"] == "bf16"
    fp32 = model_fingerprint(ModelSpec(str(tiny_qwen / "model"), precision="fp32"))
    assert "precision" not in fp32 and {k: v for k, v in auto.items() if k != "precision"} == fp32


def test_a_finetune_under_auto_follows_the_model_and_records_it(tiny_qwen, tmp_path, monkeypatch):
    """``FinetuneConfig(precision="auto")`` trains at the precision the model was loaded at (the
    Trainer's bf16 flag), an explicit one overrides it, and the model's forwards follow."""
    from saediff.data.chat_data import ChatDataset, load_chat_jsonl
    from saediff.interventions.finetune import FinetuneConfig, finetune, finetune_precision, make_trainable

    monkeypatch.setenv(precision.ENV, "fp32")
    lm = load_model(ModelSpec(str(tiny_qwen / "model"), precision="bf16"))
    cfg = FinetuneConfig(method="lora", steps=1, batch_size=2)
    model = make_trainable(lm.model, cfg)
    assert finetune_precision(cfg, model, "cpu") == "bf16"
    assert finetune_precision(FinetuneConfig(precision="fp32"), model, "cpu") == "fp32"
    monkeypatch.setenv(precision.ENV, "bf16")
    assert finetune_precision(cfg, torch.nn.Linear(2, 2), "cpu") == "fp32"  # built in place: fp32 on CPU
    monkeypatch.setenv(precision.ENV, "fp32")
    data = ChatDataset(
        lm.tokenizer, load_chat_jsonl(write_narrow_data(tmp_path / "d.jsonl", 4)), progress=False
    )
    finetune(
        model,
        lm.tokenizer,
        data,
        FinetuneConfig(method="lora", steps=1, batch_size=2, precision="fp32"),
        tmp_path / "ft",
        progress=False,
    )
    assert precision.model_precision(model) == "fp32"
    assert _matmul_dtypes(type("L", (), {"model": model})) == {torch.float32}


def test_the_cli_precision_reaches_the_model_and_its_provenance(tiny_qwen, tmp_path, monkeypatch):
    """``saediff eval --precision bf16`` scores under bf16 and says so in em.json; an fp32 rerun
    into the same folder does not reuse it; a bad value is one line."""
    import json

    from typer.testing import CliRunner

    from saediff.cli.app import app

    monkeypatch.setenv(precision.ENV, "fp32")  # restored after, whatever the command sets
    args = ["eval", "--model", str(tiny_qwen / "model"), "--pairs", "medical", "--out", str(tmp_path / "e")]
    runner = CliRunner()
    res = runner.invoke(app, [*args, "--precision", "bf16"])
    assert res.exit_code == 0, res.output
    em = json.loads((tmp_path / "e" / "em.json").read_text())
    assert '"precision": "bf16"' in json.dumps(em)
    res = runner.invoke(app, [*args, "--precision", "fp32"])
    assert res.exit_code == 0, res.output
    em32 = json.loads((tmp_path / "e" / "em.json").read_text())
    assert '"precision"' not in json.dumps(em32.get("provenance", {}))
    assert em32["preference"] != em["preference"]  # measured again, not read back
    res = runner.invoke(app, [*args, "--precision", "half"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == ["error: --precision must be auto, fp32 or bf16, got 'half'"]


def test_a_bf16_lora_holds_its_frozen_linears_cast_with_the_same_numbers(tiny_qwen, tmp_path, monkeypatch):
    """A LoRA fine-tune under bf16 holds the frozen Linear weights in bfloat16 (autocast would cast
    them at every step): the losses and the trained adapter are bit for bit those of the run that
    casts at every step; norms, embeddings and the adapter stay float32."""
    import saediff.interventions.finetune as F
    from saediff.data.chat_data import ChatDataset, load_chat_jsonl

    data_path = write_narrow_data(tmp_path / "d.jsonl", 8)
    cfg = F.FinetuneConfig(method="lora", lora_rank=2, steps=3, batch_size=4, lr=1e-2)

    def run(out: str):
        lm = load_model(ModelSpec(str(tiny_qwen / "model"), precision="bf16"))
        data = ChatDataset(lm.tokenizer, load_chat_jsonl(data_path), progress=False)
        model = F.make_trainable(lm.model, cfg)
        log = F.finetune(model, lm.tokenizer, data, cfg, tmp_path / out, progress=False)
        lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        return log, lora, {n: p.dtype for n, p in model.named_parameters()}

    held_log, held, dtypes = run("held")
    assert {d for n, d in dtypes.items() if "base_layer" in n or "proj.weight" in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "lora_" in n or "norm" in n or "embed" in n} == {torch.float32}
    monkeypatch.setattr(F, "frozen_linears_to_bf16", lambda _m: 0)
    cast_log, cast, _ = run("cast")
    assert [h["loss"] for h in held_log] == [h["loss"] for h in cast_log]
    assert all(torch.equal(held[n], cast[n]) for n in held)
