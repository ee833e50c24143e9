"""vLLM's OpenAI-compatible server as a child process: for tests, benchmarks and notebooks.

    with VllmServer(python, model_folder, adapters={"em": adapter_folder}) as server:
        client = ChatClient(server.url)        # serves "base" and, with adapters, "em"

vLLM lives in an environment of its own (its pins conflict with saediff's), so ``python`` is that
environment's interpreter, e.g. ``$SAEDIFF_VLLM_PYTHON``. The server is started in its own process
group with its output in a log file (not on the console), ready once ``/v1/models`` lists every
served name, and stopped by signalling its group (vLLM runs its engine in child processes).
``command()`` is the command line, the one ``docs/workflows/serving.md`` tells users to run.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from saediff.errors import SaediffError

__all__ = ["VllmServer", "free_port"]

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VllmServer:
    python: str | Path
    """interpreter of the environment vLLM is installed in"""
    model: str | Path
    """an HF model folder (for ``smollm2-135m``: ``saediff.models.gguf.materialize``'s folder)"""
    served_name: str = "base"
    """the name requests address the model by (``--served-model-name``)"""
    adapters: dict[str, str | Path] = field(default_factory=dict)
    """served name -> PEFT adapter folder (``--enable-lora --lora-modules NAME=PATH``)"""
    port: int | None = None
    """None: a free port"""
    dtype: str = "float32"
    max_model_len: int = 1024
    max_lora_rank: int = 8
    kv_cache_gib: int = 1
    """``VLLM_CPU_KVCACHE_SPACE``: the CPU build's KV cache, in GiB"""
    extra_args: tuple[str, ...] = ()
    startup_timeout_s: float = 300.0
    log_path: str | Path | None = None
    """where the server's output goes (default: a temp file, named in errors)"""

    def __post_init__(self):
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        """Base URL with the API prefix, for ``ChatClient`` and ``--gen-url`` / ``--judge-url``."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        """The server's process id, which is also its process group's (None before ``start``)."""
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        cmd = [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            self.served_name,
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--enforce-eager",
        ]
        if self.adapters:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--lora-modules"]
            cmd += [f"{name}={path}" for name, path in self.adapters.items()]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        }

    def start(self) -> VllmServer:
        """Start the server and wait until it serves every name; one-line error with the log's
        tail if it exits or is not ready within ``startup_timeout_s``."""
        if not Path(self.python).is_file():
            raise SaediffError(f"no vLLM interpreter at {self.python} (set SAEDIFF_VLLM_PYTHON)")
        self.port = self.port or free_port()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="vllm-", suffix=".log")
            os.close(fd)
            self.log_path = name
        self._log = open(self.log_path, "ab")  # closed in stop()
        self._proc = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.environment(),
            start_new_session=True,  # its own process group: stop() reaches the engine's children
        )
        log.info("vLLM starting on %s (pid %d, log %s)", self.url, self._proc.pid, self.log_path)
        t0 = time.monotonic()
        while not self.ready():
            if self._proc.poll() is not None:
                self._close_log()
                raise SaediffError(
                    f"vLLM exited with code {self._proc.returncode} before serving: {self._tail()}"
                )
            if time.monotonic() - t0 > self.startup_timeout_s:
                self.stop()
                raise SaediffError(
                    f"vLLM not ready after {self.startup_timeout_s:.0f} s (log {self.log_path}): {self._tail()}"
                )
            time.sleep(0.5)
        log.info("vLLM ready on %s after %.1f s", self.url, time.monotonic() - t0)
        return self

    def ready(self) -> bool:
        """``/v1/models`` answers and lists the base model and every adapter."""
        import httpx

        try:
            reply = httpx.get(self.url + "/models", timeout=2.0)
            names = {m.get("id") for m in reply.json().get("data", [])}
        except (httpx.HTTPError, ValueError, AttributeError):
            return False
        return {self.served_name, *self.adapters} <= names

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``timeout_s``; a no-op when stopped."""
        if self._proc is not None and self._proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self._proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self._proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _tail(self, n: int = 3) -> str:
        try:
            lines = [ln for ln in Path(self.log_path).read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return f"(no log at {self.log_path})"
        return " | ".join(lines[-n:])[-600:] + f" (log {self.log_path})"

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
