"""The error policy (issue 22, item 12): bad input is one unwrapped line naming what is at fault and
exit 1; a bug or an out-of-memory keeps its traceback (it printed as ``error: 'diff'``)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import saediff.saes.loading
from saediff.cli.app import app
from saediff.errors import MissingFileError, SaediffError, UnknownKeyError
from saediff.models.hooks import decoder_layers


def test_bad_input_is_one_line(tmp_path):
    r = CliRunner().invoke(app, ["sae", "info", str(tmp_path / "nowhere")])
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert r.output.startswith("error: ") and str(tmp_path / "nowhere") in r.output


@pytest.mark.parametrize("bug", [KeyError("diff"), RuntimeError("CUDA out of memory"), IndexError("3")])
def test_a_bug_keeps_its_traceback(monkeypatch, bug):
    def broken(*a, **k):
        raise bug

    monkeypatch.setattr(saediff.saes.loading, "load_sae", broken)
    r = CliRunner().invoke(app, ["sae", "info", "any"])
    assert r.exception is bug and "error:" not in r.output  # not swallowed into one line


def test_an_os_error_names_its_file(monkeypatch):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "/runs/sae/cfg.json")

    monkeypatch.setattr(saediff.saes.loading, "load_sae", denied)
    r = CliRunner().invoke(app, ["sae", "info", "any"])
    assert r.exit_code == 1 and r.output == "error: /runs/sae/cfg.json: Permission denied\n"


def test_an_unsupported_architecture_is_bad_input():
    with pytest.raises(SaediffError, match="cannot find decoder layers .* on Linear"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_the_subclasses_keep_their_builtin_types():
    assert isinstance(MissingFileError("x"), FileNotFoundError) and isinstance(
        MissingFileError("x"), SaediffError
    )
    e = UnknownKeyError("hook blocks.9 not in the model")
    assert isinstance(e, KeyError) and str(e) == "hook blocks.9 not in the model"  # KeyError would quote it


def test_a_tokenizer_without_a_chat_template_is_one_line(tiny_qwen):
    """A base model's tokenizer has no chat template: saediff renders every prompt with one, so this
    is bad input named in one line, not transformers' traceback."""
    from transformers import AutoTokenizer

    from saediff.models.loading import chat_tokens

    tok = AutoTokenizer.from_pretrained(tiny_qwen / "model")
    tok.chat_template = None
    with pytest.raises(SaediffError, match="has no chat template: use a chat"):
        chat_tokens(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
