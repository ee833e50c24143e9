"""VllmServer without vLLM: the command it runs and its one-line failures (tests/test_vllm.py starts
the real server)."""

from __future__ import annotations

import sys

import pytest

from saediff.errors import SaediffError
from saediff.evaluation.vllm_server import VllmServer


def test_the_command_serves_the_base_model_and_each_adapter(tmp_path):
    server = VllmServer(
        "py", tmp_path / "model", served_name="smol", adapters={"em": tmp_path / "a"}, port=8123
    )
    cmd = server.command()
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert (
        flags["--served-model-name"] == "smol"
        and flags["--host"] == "127.0.0.1"
        and flags["--port"] == "8123"
    )
    assert "--enable-lora" in cmd and cmd[-1] == f"em={tmp_path / 'a'}" and cmd[-2] == "--lora-modules"
    assert server.url == "http://127.0.0.1:8123/v1"
    assert "--enable-lora" not in VllmServer("py", tmp_path / "model", port=1).command()
    assert server.environment()["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_a_missing_interpreter_is_one_line(tmp_path):
    with pytest.raises(SaediffError, match="no vLLM interpreter at .*SAEDIFF_VLLM_PYTHON"):
        VllmServer(tmp_path / "nowhere" / "python", tmp_path).start()


def test_a_server_that_exits_is_one_line_with_its_log(tmp_path):
    """This environment has no vLLM: the server exits at once, and the error quotes its log."""
    pytest.importorskip("httpx")
    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    server = VllmServer(sys.executable, tmp_path, log_path=tmp_path / "vllm.log", startup_timeout_s=60)
    with pytest.raises(SaediffError) as e:
        server.start()
    assert "vLLM exited with code 1 before serving" in str(e.value) and "vllm" in str(e.value)
    assert "\n" not in str(e.value) and str(tmp_path / "vllm.log") in str(e.value)
