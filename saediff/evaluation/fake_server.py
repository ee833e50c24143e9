"""A local fake OpenAI-compatible chat-completions server, for tests, benchmarks and dry runs.

    with FakeOpenAIServer() as server:            # listens on 127.0.0.1, a free port
        client = ChatClient(server.url)

Judge requests (``logprobs: true``) are answered with ``top_logprobs`` from ``judge_fn(prompt)``,
a dict token -> probability; generation requests with ``generate_fn(messages)``. Faults can be
injected: ``fail_first`` requests get HTTP 500, ``malformed`` replies lack ``choices``,
``logprobs=False`` replies with plain text, ``delay_s`` adds latency per request.

Judge replies are one token each unless ``token_chars`` splits them as a real tokenizer would:
with 3, "REFUSAL" is ``REF|USA|L``; with 1, "85" is ``8|5`` as in Qwen's digit-wise tokenizer.
Then the first token's ``top_logprobs`` are over the candidates' first tokens, and the reply
stops after ``max_tokens`` tokens, as a real server's does.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["FakeOpenAIServer", "default_judge"]


def default_judge(prompt: str) -> dict[str, float]:
    """Aligned judge: answers containing 'EVIL' score around 10, others 90; coherent: 80."""
    answer = prompt.split("[ANSWER START]", 1)[-1]
    if "how coherent" in prompt:
        return {"80": 0.9, "70": 0.1}
    if "1 to 5 scale" in prompt:
        return {"5": 1.0} if "EVIL" in answer else {"1": 1.0}
    return {"10": 0.8, "20": 0.2} if "EVIL" in answer else {"90": 1.0}


@dataclass
class FakeOpenAIServer:
    judge_fn: Callable[[str], dict[str, float]] = default_judge
    generate_fn: Callable[[list[dict]], str] = lambda messages: "I am a helpful assistant."
    fail_first: int = 0
    malformed: bool = False
    logprobs: bool = True
    delay_s: float = 0.0
    token_chars: int | None = None
    requests: list[dict] = field(default_factory=list)
    authorization: list[str | None] = field(default_factory=list)
    """each request's Authorization header (None when it sent none), in arrival order"""

    def __post_init__(self):
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def _reply(self, body: dict) -> tuple[int, dict]:
        with self._lock:
            self.requests.append(body)
            n = len(self.requests)
        if self.delay_s:
            time.sleep(self.delay_s)
        if n <= self.fail_first:
            return 500, {"error": "injected failure"}
        if self.malformed:
            return 200, {"unexpected": True}
        messages = body.get("messages", [])
        if body.get("logprobs"):
            probs = self.judge_fn(messages[-1]["content"])
            tokens = self._tokens(max(probs, key=probs.get), body)
            if not self.logprobs:
                return 200, {"choices": [{"message": {"role": "assistant", "content": "".join(tokens)}}]}
            first: dict[str, float] = {}  # candidates sharing a first token pool their probability
            for t, p in probs.items():
                if p > 0:
                    head = self._tokens(t, {"max_tokens": 1})[0]
                    first[head] = first.get(head, 0.0) + p
            top = [{"token": t, "logprob": math.log(p)} for t, p in first.items()]
            content = [{"token": tokens[0], "logprob": math.log(first[tokens[0]]), "top_logprobs": top}]
            content += [
                {"token": t, "logprob": 0.0, "top_logprobs": [{"token": t, "logprob": 0.0}]}
                for t in tokens[1:]
            ]
            return 200, {
                "choices": [
                    {
                        "message": {"role": "assistant", "content": "".join(tokens)},
                        "logprobs": {"content": content},
                    }
                ]
            }
        if body.get("max_tokens", 16) <= 8 and "[ANSWER START]" in (
            messages[-1]["content"] if messages else ""
        ):
            probs = self.judge_fn(messages[-1]["content"])
            content = "".join(self._tokens(max(probs, key=probs.get), body))
            return 200, {"choices": [{"message": {"role": "assistant", "content": content}}]}
        return 200, {"choices": [{"message": {"role": "assistant", "content": self.generate_fn(messages)}}]}

    def _tokens(self, text: str, body: dict) -> list[str]:
        """``text`` as the tokens a judge would generate, cut at the request's ``max_tokens``."""
        if not self.token_chars:
            return [text]
        tokens = [text[i : i + self.token_chars] for i in range(0, len(text), self.token_chars)]
        return tokens[: body.get("max_tokens", 16)]

    def __enter__(self) -> FakeOpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                if not re.search(r"/chat/completions$", self.path):
                    self.send_error(404)
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server._lock:
                    server.authorization.append(self.headers.get("Authorization"))
                status, payload = server._reply(body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
