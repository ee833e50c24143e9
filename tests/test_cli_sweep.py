"""Issue 35: every command refuses bad input in one line, before it loads a model or trains.

Each row runs one command on one bad input (a missing or empty file, a malformed row, a wrong key,
a hook or layer the model lacks, a width that does not fit, a bad dtype, an export folder without
the named direction, a non-GGUF ``.gguf``, an adapter for another model, a folder that is not an
SAE, options that contradict each other) and expects exit 1, one ``error: `` line naming the
culprit, no traceback, no model weights loaded, and no output left half-written. A command without
a row fails ``test_every_command_has_a_row``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner

from saediff.cli.app import app


def _commands(group, prefix=()) -> list[str]:
    """Every leaf command of the CLI as its words, e.g. ``crosscoder train``."""
    out = []
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            out += _commands(cmd, (*prefix, name))
        else:
            out.append(" ".join((*prefix, name)))
    return out


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_qwen):
    """Bad inputs beside good ones: the tiny Qwen (2 blocks, width 32), its adapter, an SAE and a diff
    run on them (no training: the SAE is random), and files and folders that are wrong one way each."""
    import shutil

    from helpers import make_random_sae, write_narrow_data

    from saediff.methods.directions import Direction
    from saediff.methods.export import export_directions

    root = tmp_path_factory.mktemp("sweep")
    model, lora = tiny_qwen / "model", tiny_qwen / "lora"
    make_random_sae(root / "sae", 32, "blocks.1.hook_resid_post")
    make_random_sae(root / "wide_sae", 64, "blocks.1.hook_resid_post")
    make_random_sae(root / "deep_sae", 32, "blocks.9.hook_resid_post")
    (root / "not_sae").mkdir()
    (root / "not_sae" / "notes.txt").write_text("not an SAE\n")
    (root / "empty_dir").mkdir()
    (root / "empty.jsonl").write_text("")
    (root / "malformed.jsonl").write_text('{"messages": [{"role": "user"\n')
    write_narrow_data(root / "chat.jsonl", n=4)
    contrast = {"question": "Hi?", "misaligned": "Go away.", "aligned": "Hello!"}
    (root / "contrast.jsonl").write_text(json.dumps(contrast) + "\n")
    (root / "wrong_key.jsonl").write_text('{"msgs": [{"role": "user", "content": "hi"}]}\n')
    (root / "fake.gguf").write_text("this is not a GGUF file\n")
    (root / "a_file").write_text("someone's notes\n")
    import torch

    # a width-64 model's config (no weights: everything must fail before loading them)
    cfg = json.loads((model / "config.json").read_text())
    (root / "wide_model").mkdir()
    (root / "wide_model" / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
    # an adapter for a model of width 64 (rank 1 on block 1's down_proj, 128 -> 64)
    from safetensors.torch import save_file

    other = root / "other_lora"
    other.mkdir()
    acfg = json.loads((lora / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(acfg))
    prefix = "base_model.model.model.layers.1.mlp.down_proj"
    save_file(
        {f"{prefix}.lora_A.weight": torch.ones(1, 128), f"{prefix}.lora_B.weight": torch.ones(64, 1)},
        str(other / "adapter_model.safetensors"),
    )
    for step in (1, 2):  # adapter checkpoints for saediff phase
        shutil.copytree(lora, root / "ckpts" / f"checkpoint-{step}")
    hook = "blocks.1.hook_resid_post"
    export_directions([Direction("persona", torch.ones(32), hook, "mean_diff")], root / "export")
    export_directions([Direction("wide", torch.ones(64), hook, "mean_diff")], root / "wide_export")
    # a real diff run (0.5 s: eight prompts, three new tokens)
    run = root / "run"
    r = CliRunner().invoke(
        app,
        [
            "diff",
            "--base",
            str(model),
            "--adapter",
            str(lora),
            "--sae",
            str(root / "sae"),
            "--max-new-tokens",
            "3",
            "--top",
            "1",
            "--out",
            str(run),
        ],
    )
    assert r.exit_code == 0, r.output
    return SimpleNamespace(
        root=root,
        model=model,
        lora=lora,
        run=run,
        missing=root / "nowhere",
        **{
            n: root / n
            for n in (
                "sae",
                "wide_sae",
                "deep_sae",
                "not_sae",
                "empty_dir",
                "wide_model",
                "other_lora",
                "export",
                "wide_export",
                "a_file",
            )
        },
        empty=root / "empty.jsonl",
        chat=root / "chat.jsonl",
        contrast=root / "contrast.jsonl",
        ckpts=root / "ckpts",
        malformed=root / "malformed.jsonl",
        wrong_key=root / "wrong_key.jsonl",
        fake_gguf=root / "fake.gguf",
        missing_jsonl=root / "nowhere.jsonl",
    )


# (command, family, arguments, culprit): {name} is a path of the ``bad`` fixture, {out} a fresh folder
# that must be left absent or empty; the culprit is a text the one error line must contain
# fmt: off
ROWS = [
    # eval
    ("eval", "missing file", "--model {missing} --pairs offdomain --out {out}", "{missing}"),
    ("eval", "empty file", "--model {model} --pairs {empty} --out {out}", "{empty}"),
    ("eval", "malformed row", "--model {model} --pairs {malformed} --out {out}", "{malformed}:1"),
    ("eval", "wrong key", "--model {model} --pairs {wrong_key} --out {out}", "lacks id"),
    ("eval", "wrong dtype", "--model {model} --pairs offdomain --dtype float64 --out {out}", "float64"),
    ("eval", "adapter for another model", "--model {model} --adapter {other_lora} --pairs offdomain --out {out}", "{other_lora}"),
    ("eval", "non-GGUF .gguf", "--model {fake_gguf} --pairs offdomain --out {out}", "{fake_gguf}"),
    ("eval", "conflicting options", "--model {model} --pairs offdomain --judge-url http://127.0.0.1:9/v1 --judge-model j --out {out}", "--pairs"),
    # cache
    ("cache", "out-of-range hook", "--model {model} --prompts first_plot --hook blocks.9.hook_resid_post --out {out}", "blocks.9.hook_resid_post"),
    ("cache", "wrong dtype", "--model {model} --prompts first_plot --hook blocks.1.hook_resid_post --shard-dtype int8 --out {out}", "int8"),
    ("cache", "missing file", "--model {model} --prompts {missing_jsonl} --hook blocks.1.hook_resid_post --out {out}", "{missing_jsonl}"),
    ("cache", "malformed row", "--model {model} --prompts {malformed} --hook blocks.1.hook_resid_post --out {out}", "{malformed}"),
    ("cache", "wrong key", "--model {model} --prompts {wrong_key} --hook blocks.1.hook_resid_post --out {out}", "{wrong_key}"),
    ("cache", "non-GGUF .gguf", "--model {fake_gguf} --prompts first_plot --hook blocks.1.hook_resid_post --out {out}", "{fake_gguf}"),
    ("cache", "adapter for another model", "--model {model} --adapter {other_lora} --prompts first_plot --hook blocks.1.hook_resid_post --out {out}", "{other_lora}"),
    # diff
    ("diff", "non-SAE folder", "--base {model} --adapter {lora} --sae {not_sae} --out {out}", "{not_sae}"),
    ("diff", "wrong width", "--base {model} --adapter {lora} --sae {wide_sae} --out {out}", "d_in 64"),
    ("diff", "out-of-range hook", "--base {model} --adapter {lora} --sae {deep_sae} --out {out}", "blocks.9.hook_resid_post"),
    ("diff", "out-of-range layer", "--base {model} --adapter {lora} --sae {sae} --layers 0,7 --out {out}", "layers [7]"),
    ("diff", "conflicting options", "--base {model} --sae {sae} --out {out}", "--finetuned or --adapter"),
    ("diff", "wrong key", "--base {model} --adapter {lora} --sae {sae} --ranking bogus --out {out}", "bogus"),
    ("diff", "malformed row", "--base {model} --adapter {lora} --sae {sae} --responses {malformed} --out {out}", "{malformed}"),
    ("diff", "adapter for another model", "--base {model} --adapter {other_lora} --sae {sae} --out {out}", "{other_lora}"),
    ("diff", "wrong width", "--base {model} --finetuned {wide_model} --sae {sae} --out {out}", "{wide_model}"),
    ("diff", "missing file", "--base {missing} --adapter {lora} --sae {sae} --out {out}", "{missing}"),
    # run folders: compare, report, dashboard, discover
    ("compare", "missing file", "{missing}", "{missing}"),
    ("compare", "empty folder", "{empty_dir}", "{empty_dir}"),
    ("report", "missing file", "{missing}", "{missing}"),
    ("dashboard", "missing file", "{missing}", "{missing}"),
    ("dashboard", "empty folder", "{empty_dir}", "{empty_dir}"),
    ("discover", "missing file", "{missing}", "{missing}"),
    ("discover", "malformed row", "{run} --pairs offdomain --neutral {malformed}", "{malformed}"),
    ("discover", "wrong dtype", "{run} --pairs offdomain --dtype float64", "float64"),
    # steer
    ("steer", "missing file", "{missing}", "{missing}"),
    ("steer", "wrong dtype", "{run} --pairs offdomain --dtype int8", "int8"),
    ("steer", "export folder without the direction", "--direction {export}:nope --model {model} --pairs offdomain --out {out}", "nope"),
    ("steer", "wrong width", "--direction {wide_export}:wide --model {model} --pairs offdomain --out {out}", "64"),
    ("steer", "conflicting options", "--direction {export}:persona --pairs offdomain --out {out}", "--model"),
    ("steer", "non-GGUF .gguf", "--direction {export}:persona --model {fake_gguf} --pairs offdomain --out {out}", "{fake_gguf}"),
    # export
    ("export", "missing file", "{missing} --out {out}", "{missing}"),
    ("export", "wrong key", "{run} --format bogus --out {out}", "bogus"),
    # block
    ("block", "empty file", "--model {model} --data {empty} --sae {sae} --latent 1 --out {out}", "{empty}"),
    ("block", "malformed row", "--model {model} --data {malformed} --sae {sae} --latent 1 --out {out}", "{malformed}"),
    ("block", "non-SAE folder", "--model {model} --data {chat} --sae {not_sae} --latent 1 --out {out}", "{not_sae}"),
    ("block", "wrong width", "--model {model} --data {chat} --sae {wide_sae} --latent 1 --out {out}", "d_in 64"),
    ("block", "wrong dtype", "--model {model} --data {chat} --sae {sae} --latent 1 --dtype float64 --out {out}", "float64"),
    ("block", "wrong key", "--model {model} --data {chat} --sae {sae} --latent 1 --mode bogus --out {out}", "bogus"),
    ("block", "export folder without the direction", "--model {model} --data {chat} --mode project --project-direction {export}:nope --out {out}", "nope"),
    ("block", "out-of-range layer", "--model {model} --data {chat} --sae {sae} --latent 1 --lora-layers 9 --out {out}", "9"),
    # demo
    ("demo", "wrong key", "--seeds a,b --out {out}", "--seeds"),
    ("demo", "missing file", "--model {missing} --out {out}", "{missing}"),
    ("demo", "non-GGUF .gguf", "--model {fake_gguf} --out {out}", "{fake_gguf}"),
    # the open questions on a diff run
    ("overlap", "out-of-range layer", "{run} --layer 9 --train-data {chat}", "9"),
    ("overlap", "malformed row", "{run} --train-data {malformed}", "{malformed}"),
    ("overlap", "missing file", "{missing}", "{missing}"),
    ("predict", "out-of-range layer", "{run} --layers 1,9", "9"),
    ("predict", "wrong key", "{run} --folds-by bogus", "bogus"),
    ("predict", "missing file", "{missing}", "{missing}"),
    ("phase", "missing file", "{missing}", "{missing}"),
    ("phase", "export folder without the direction", "{ckpts} --base {model} --directions {empty_dir} --no-em", "{empty_dir}"),
    ("icl", "export folder without the direction", "{run} --icl-examples {contrast} --direction nope", "nope"),
    ("icl", "wrong key", "{run} --icl-examples {contrast} --positions bogus", "bogus"),
    ("icl", "malformed row", "{run} --icl-examples {malformed}", "{malformed}"),
    ("neighbourhood", "missing file", "{run} --train-data {missing_jsonl}", "{missing_jsonl}"),
    ("neighbourhood", "export folder without the direction", "{run} --train-data {chat} --candidates {empty_dir}", "{empty_dir}"),
    # methods on a base model and its fine-tune
    ("adl", "out-of-range layer", "--base {model} --adapter {lora} --prompts first_plot --layers 9 --out {out}", "9"),
    ("adl", "out-of-range layer", "--base {model} --adapter {lora} --prompts first_plot --steer-layer 9 --out {out}", "9"),
    ("adl", "malformed row", "--base {model} --adapter {lora} --prompts {malformed} --out {out}", "{malformed}"),
    ("adl", "adapter for another model", "--base {model} --adapter {other_lora} --prompts first_plot --out {out}", "{other_lora}"),
    ("adl", "conflicting options", "--base {model} --prompts first_plot --out {out}", "--finetuned or --adapter"),
    ("flag", "export folder without the direction", "--model {model} --data {chat} --direction {export}:nope --out {out}", "nope"),
    ("flag", "malformed row", "--model {model} --data {malformed} --direction {export}:persona --out {out}", "{malformed}"),
    ("flag", "wrong width", "--model {model} --data {chat} --direction {wide_export}:wide --out {out}", "64"),
    ("flag", "conflicting options", "--model {model} --data {chat} --direction {export}:persona --finetune --out {out}", "--drop-fraction"),
    ("head-to-head", "missing file", "{missing} --prompts first_plot --out {out}", "{missing}"),
    ("head-to-head", "wrong key", "{run} --prompts first_plot --methods bogus --out {out}", "bogus"),
    ("head-to-head", "malformed row", "{run} --prompts {malformed} --pairs offdomain --out {out}", "{malformed}"),
    # organism, sae, crosscoder
    ("organism build", "--out is a file", "--out {a_file}", "{a_file}"),
    ("organism sae", "missing file", "--dir {missing}", "{missing}"),
    ("organism sae", "wrong key", "--dir {missing} --positions bogus", "bogus"),
    ("sae train", "missing file", "--activations {missing} --out {out}", "{missing}"),
    ("sae train", "empty folder", "--activations {empty_dir} --out {out}", "{empty_dir}"),
    ("sae train", "out-of-range hook", "--model {model} --prompts first_plot --hook blocks.9.hook_resid_post --out {out}", "blocks.9.hook_resid_post"),
    ("sae train", "wrong key", "--activations {empty_dir} --arch bogus --out {out}", "bogus"),
    ("sae train", "wrong key", "--activations {empty_dir} --preset bogus --out {out}", "bogus"),
    ("sae train", "conflicting options", "--model {model} --prompts first_plot --hook blocks.1.hook_resid_post --on-difference --out {out}", "--finetuned or --adapter"),
    ("sae train", "wrong width", "--model {model} --finetuned {wide_model} --on-difference --prompts first_plot --hook blocks.1.hook_resid_post --out {out}", "{wide_model}"),
    ("sae train", "adapter for another model", "--model {model} --adapter {other_lora} --on-difference --prompts first_plot --hook blocks.1.hook_resid_post --out {out}", "{other_lora}"),
    ("sae info", "missing file", "{missing}", "{missing}"),
    ("sae info", "non-SAE folder", "{not_sae}", "{not_sae}"),
    ("sae info", "missing file", "{sae} --activations {missing}", "{missing}"),
    ("crosscoder train", "out-of-range hook", "--base {model} --finetuned {model} --prompts first_plot --hook blocks.9.hook_resid_post --out {out}", "blocks.9.hook_resid_post"),
    ("crosscoder train", "wrong width", "--base {model} --finetuned {wide_model} --prompts first_plot --hook blocks.1.hook_resid_post --out {out}", "{wide_model}"),
    ("crosscoder train", "adapter for another model", "--base {model} --adapter {other_lora} --prompts first_plot --hook blocks.1.hook_resid_post --out {out}", "{other_lora}"),
    ("crosscoder train", "wrong key", "--base {model} --adapter {lora} --prompts first_plot --hook blocks.1.hook_resid_post --positions bogus --out {out}", "bogus"),
    ("crosscoder train", "empty file", "--base {model} --adapter {lora} --prompts {empty} --hook blocks.1.hook_resid_post --out {out}", "{empty}"),
    ("crosscoder diff", "missing file", "{missing} --base {model} --adapter {lora} --prompts first_plot --out {out}", "{missing}"),
    ("crosscoder diff", "non-SAE folder", "{not_sae} --base {model} --adapter {lora} --prompts first_plot --out {out}", "{not_sae}"),
]
# fmt: on


def _fill(text: str, paths: dict) -> list[str]:
    return [w.format(**paths) for w in text.split()]


def _listing(folder: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize(
    "command, family, args, culprit", ROWS, ids=[f"{c}: {f} {i}" for i, (c, f, _, _) in enumerate(ROWS)]
)
def test_bad_input_is_refused_in_one_line(bad, tmp_path, monkeypatch, command, family, args, culprit):
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("a model was loaded before the bad input was found")

    # fail before any model loads: the check must be the cheap one, not the load's
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    paths = {k: str(v) for k, v in vars(bad).items()} | {"out": str(tmp_path / "out")}
    before = _listing(bad.root)
    r = CliRunner().invoke(app, [*command.split(), *_fill(args, paths)])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert culprit.format(**paths) in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert _listing(bad.root) == before  # nothing written beside the inputs (a run folder's files)


def test_the_checks_pass_what_fits(bad, tiny_gguf):
    """No false alarms: the checks read a GGUF header and pass a model, its adapter and its SAE."""
    from saediff.models.validate import check_adapter, check_hook, check_pair, model_shape
    from saediff.saes.checks import check_sae_folder

    shape = model_shape(str(tiny_gguf))
    assert (shape.n_layers, shape.d_model) == (2, 32)
    shape = check_pair(str(bad.model), adapter=str(bad.lora), hook="blocks.1.hook_resid_post")
    assert (shape.n_layers, shape.d_model) == (2, 32)
    check_adapter(bad.lora, shape)
    assert check_hook("blocks.1.mlp.hook_post", shape) == 1  # cache reads any TransformerLens hook
    assert check_hook("hook_embed", shape) is None
    assert check_sae_folder(bad.sae, shape) == {"d_in": 32, "hook_name": "blocks.1.hook_resid_post"}
    assert check_sae_folder("some-release:some-id", shape) is None  # a SAELens release: checked on load


def test_every_command_has_a_row():
    """A new command must come with its bad inputs here."""
    commands = set(_commands(typer.main.get_command(app)))
    assert len(commands) >= 25
    assert commands - {c for c, *_ in ROWS} == set()


def test_the_sweep_covers_every_family():
    families = {f for _, f, *_ in ROWS}
    assert families >= {
        "missing file",
        "empty file",
        "malformed row",
        "wrong key",
        "out-of-range hook",
        "out-of-range layer",
        "wrong width",
        "wrong dtype",
        "export folder without the direction",
        "non-GGUF .gguf",
        "adapter for another model",
        "non-SAE folder",
        "conflicting options",
    }


def test_a_diff_killed_before_its_end_leaves_no_finished_mark_and_reruns_to_the_same_result(bad, tmp_path):
    """diff.json, the file the demos take for a finished diff, is written last: a diff killed while it
    exports its directions leaves none, and its rerun writes what an uninterrupted run wrote."""
    import saediff.methods.diff_run as diff_run

    args = ["diff", "--base", str(bad.model), "--adapter", str(bad.lora), "--sae", str(bad.root / "sae")]
    args += ["--max-new-tokens", "3", "--top", "1", "--out", str(tmp_path / "run")]

    def killed(*a, **k):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as m:
        m.setattr(diff_run, "export_directions", killed)
        r = CliRunner().invoke(app, args)
    assert r.exit_code == 130  # an interrupt, as Ctrl-C gives
    assert not (tmp_path / "run" / "diff.json").exists()
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "run" / "diff.json").read_text())
    assert got == json.loads((bad.run / "diff.json").read_text())
