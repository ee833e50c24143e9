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

Replies have the shape vLLM 0.32 sends (recorded from its CPU build serving SmolLM2): every
logprob entry carries ``bytes`` (UTF-8 of the token), choices carry ``finish_reason``,
``stop_reason`` and ``token_ids``, the reply ``id``, ``usage``, ``prompt_logprobs`` and more;
``top_logprobs`` above ``max_logprobs`` (20) is refused with HTTP 400 and vLLM's error body; a
``model`` not in ``models`` (when given) gets vLLM's 404; ``structured_outputs.regex`` keeps the
judge's candidates that match it, renormalized (vLLM reports logprobs after the grammar's mask),
unless ``structured=False`` (a server that ignores the field). ``GET /v1/models`` lists ``models``.
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
    max_logprobs: int = 20
    models: tuple[str, ...] | None = None
    """served names: a request for another gets a 404 (None: any name is served)"""
    structured: bool = True
    """honour ``structured_outputs.regex`` (False: ignore it, as servers without the feature do)"""
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
        error = self._refusal(body)
        if error is not None:
            return error
        messages = body.get("messages", [])
        if body.get("logprobs"):
            probs = self._constrained(self.judge_fn(messages[-1]["content"]), body)
            tokens = self._tokens(max(probs, key=probs.get), body)
            if not self.logprobs:
                return 200, _completion(body, "".join(tokens), None)
            first: dict[str, float] = {}  # candidates sharing a first token pool their probability
            for t, p in probs.items():
                if p > 0:
                    head = self._tokens(t, {"max_tokens": 1})[0]
                    first[head] = first.get(head, 0.0) + p
            top = sorted(first.items(), key=lambda tp: -tp[1])[: body.get("top_logprobs") or 0]
            content = [
                _entry(tokens[0], math.log(first[tokens[0]]), [_entry(t, math.log(p)) for t, p in top])
            ]
            content += [_entry(t, 0.0, [_entry(t, 0.0)]) for t in tokens[1:]]
            return 200, _completion(body, "".join(tokens), content)
        if body.get("max_tokens", 16) <= 8 and "[ANSWER START]" in (
            messages[-1]["content"] if messages else ""
        ):
            probs = self._constrained(self.judge_fn(messages[-1]["content"]), body)
            return 200, _completion(body, "".join(self._tokens(max(probs, key=probs.get), body)), None)
        return 200, _completion(body, self.generate_fn(messages), None)

    def _refusal(self, body: dict) -> tuple[int, dict] | None:
        """vLLM's 400 for too many top_logprobs and 404 for an unknown model, else None."""
        k = body.get("top_logprobs")
        if body.get("logprobs") and k is not None and k > self.max_logprobs:
            message = (
                f"Requested sample logprobs of {k}, which is greater than max allowed: {self.max_logprobs} "
                f"(parameter=logprobs, value={k})"
            )
            return 400, _error(message, "BadRequestError", 400, param="logprobs")
        if self.models is not None and body.get("model") not in self.models:
            return 404, _error(f"The model `{body.get('model')}` does not exist.", "NotFoundError", 404)
        return None

    def _constrained(self, probs: dict[str, float], body: dict) -> dict[str, float]:
        """The candidates a ``structured_outputs.regex`` allows, renormalized (when honoured)."""
        regex = (body.get("structured_outputs") or {}).get("regex")
        if regex is None or not self.structured:
            return probs
        kept = {t: p for t, p in probs.items() if re.fullmatch(regex, t)}
        total = sum(kept.values())
        return {t: p / total for t, p in kept.items()} if total > 0 else {"0": 1.0}

    def _tokens(self, text: str, body: dict) -> list[str]:
        """``text`` as the tokens a judge would generate, cut at the request's ``max_tokens``."""
        if not self.token_chars:
            return [text]
        tokens = [text[i : i + self.token_chars] for i in range(0, len(text), self.token_chars)]
        return tokens[: body.get("max_tokens", 16)]

    def __enter__(self) -> FakeOpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if not self.path.rstrip("/").endswith("/v1/models"):
                    self.send_error(404)
                    return
                names = server.models or ("fake",)
                self._send(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                if not re.search(r"/chat/completions$", self.path):
                    self.send_error(404)
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server._lock:
                    server.authorization.append(self.headers.get("Authorization"))
                self._send(*server._reply(body))

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _entry(token: str, logprob: float, top: list[dict] | None = None) -> dict:
    """One logprob entry as vLLM sends it: the token's text, its log-probability, its UTF-8 bytes."""
    e = {"token": token, "logprob": logprob, "bytes": list(token.encode())}
    return e if top is None else {**e, "top_logprobs": top}


def _completion(body: dict, text: str, content: list[dict] | None) -> dict:
    """A chat completion with the fields vLLM 0.32 sends (the unused ones null)."""
    n = max(1, len(content or []) or len(text.split()))
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text, "refusal": None, "reasoning": None},
        "logprobs": None if content is None else {"content": content},
        "finish_reason": "length" if n >= body.get("max_tokens", 1 << 30) else "stop",
        "stop_reason": None,
        "token_ids": None,
    }
    return {
        "id": f"chatcmpl-fake{time.monotonic_ns():x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n},
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "kv_transfer_params": None,
    }


def _error(message: str, kind: str, code: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
