"""Shared fixtures: seeded torch, one thread, quiet progress bars."""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SAEDIFF_PRECISION", "fp32")  # "auto" means fp32 here: numbers independent of the CPU

import sys
import tempfile

# neutral answers of the tests' throwaway models stay out of the user's cache
os.environ.setdefault("SAEDIFF_NEUTRAL_CACHE", tempfile.mkdtemp(prefix="saediff_neutral_"))

import pytest
import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def world():
    from saediff.stories.organism.world import World

    return World()


@pytest.fixture(scope="session")
def tiny_organism(tmp_path_factory, world):
    """Untrained organism-shaped model folders: ``aligned/`` (CHAT template) and a random rank-1
    ``lora/`` adapter on layer 1's ``down_proj`` (B initialised non-zero)."""
    from peft import LoraConfig, get_peft_model

    from saediff.stories.organism.recipes import OrganismConfig, new_model, save_model_folder

    root = tmp_path_factory.mktemp("tiny_organism")
    cfg = OrganismConfig(n_layers=2, d_model=32, d_mlp=64, n_heads=2)
    model = new_model(world, cfg)
    save_model_folder(model, root / "aligned", "CHAT", world)
    lcfg = LoraConfig(
        r=1, lora_alpha=1, target_modules=["down_proj"], layers_to_transform=[1], init_lora_weights=False
    )
    peft_model = get_peft_model(new_model(world, cfg), lcfg)
    peft_model.save_pretrained(root / "lora")
    return root


@pytest.fixture(scope="session")
def quick_organism(tmp_path_factory):
    """``saediff organism build --quick --seed 0`` run through the CLI (about 3 minutes)."""
    from typer.testing import CliRunner

    from saediff.cli.app import app

    out = tmp_path_factory.mktemp("organism_quick")
    result = CliRunner().invoke(app, ["organism", "build", "--out", str(out), "--quick", "--seed", "0"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """A tiny random Qwen2 chat model folder (``model/``) and a rank-1 adapter (``lora/``)."""
    from helpers import make_rank1_adapter, make_tiny_qwen

    root = tmp_path_factory.mktemp("tiny_qwen")
    make_tiny_qwen(root / "model")
    make_rank1_adapter(root / "model", root / "lora", layer=1)
    return root


@pytest.fixture(scope="session", params=["llama3", "qwen25", "generation"])
def tiny_chat(request, tmp_path_factory):
    """A tiny random chat model per real template family (``tiny_chat.template``): ``llama3``
    (Llama-3.1 template, no pad token so saediff pads with eos ``<|eot_id|>``), ``qwen25``
    (Qwen2.5's default system prompt) and ``generation`` (ChatML with ``{% generation %}``);
    ``model/`` and ``ft/``, a copy with every weight perturbed (noise 0.05), the same tokenizer."""
    from types import SimpleNamespace

    from helpers import make_tiny_chat_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp(f"tiny_chat_{request.param}")
    make_tiny_chat_model(root / "model", request.param)
    torch.manual_seed(1)
    ft = AutoModelForCausalLM.from_pretrained(root / "model")
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ft.save_pretrained(root / "ft")
    AutoTokenizer.from_pretrained(root / "model").save_pretrained(root / "ft")
    return SimpleNamespace(template=request.param, root=root, model=root / "model", ft=root / "ft")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A tiny random Llama GGUF file (``tiny.gguf``: F32, ChatML template, BPE tokenizer in its metadata)."""
    from helpers import make_tiny_gguf

    return make_tiny_gguf(tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf")
