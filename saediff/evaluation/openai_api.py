"""A small client for OpenAI-compatible chat-completions servers (OpenAI, vLLM, a local fake).

Retries with exponential backoff on connection errors, timeouts, 429 and 5xx; one-line errors
otherwise. The API key is read from an environment variable at call time and never stored.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from urllib.parse import urlparse

from saediff.errors import SaediffError

__all__ = ["ApiError", "ChatClient"]

log = logging.getLogger(__name__)


class ApiError(SaediffError, RuntimeError):
    """A chat-completions call failed; the message says which server and why, in one line."""


@dataclass(frozen=True)
class ChatClient:
    url: str
    """base URL including the API prefix, e.g. ``http://127.0.0.1:8000/v1``"""
    api_key_env: str | None = "OPENAI_API_KEY"
    """environment variable holding the key; required unless the server is on localhost.
    None: send no key (a server that needs none, e.g. vLLM started without --api-key)"""
    timeout_s: float = 60.0
    max_retries: int = 4
    backoff_s: float = 1.0
    """first retry delay; doubles on each retry"""

    @property
    def is_local(self) -> bool:
        return (urlparse(self.url).hostname or "") in {"127.0.0.1", "localhost", "::1"}

    def _headers(self) -> dict[str, str]:
        if self.api_key_env is None:
            return {}
        key = os.environ.get(self.api_key_env)
        if not key and not self.is_local:
            raise ApiError(f"no API key: set the environment variable {self.api_key_env} for {self.url}")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def chat(self, body: dict, client=None) -> dict:
        """POST ``body`` to ``{url}/chat/completions`` and return the decoded JSON reply."""
        import httpx

        endpoint = self.url.rstrip("/") + "/chat/completions"
        headers = self._headers()
        own = client is None
        client = client or httpx.Client(timeout=self.timeout_s)
        try:
            for attempt in range(self.max_retries + 1):
                why = None
                try:
                    resp = client.post(endpoint, json=body, headers=headers)
                except httpx.TransportError as e:  # connection refused, timeout, reset
                    why = f"unreachable ({type(e).__name__}: {e})"
                else:
                    if resp.status_code == 429 or resp.status_code >= 500:
                        why = f"HTTP {resp.status_code}: {resp.text[:200]!r}"
                    elif resp.status_code >= 400:
                        raise ApiError(
                            f"{endpoint} refused the request: HTTP {resp.status_code}: {resp.text[:200]!r}"
                        )
                    else:
                        try:
                            return resp.json()
                        except ValueError:
                            raise ApiError(f"{endpoint} replied with non-JSON: {resp.text[:200]!r}") from None
                if attempt < self.max_retries:
                    delay = self.backoff_s * 2**attempt
                    log.warning(
                        "%s %s; retry %d/%d in %.1fs", endpoint, why, attempt + 1, self.max_retries, delay
                    )
                    time.sleep(delay)
            raise ApiError(f"{endpoint} failed after {self.max_retries + 1} tries: {why}")
        finally:
            if own:
                client.close()

    def client(self):
        """A pooled ``httpx.Client`` to share between threads."""
        import httpx

        return httpx.Client(timeout=self.timeout_s, limits=httpx.Limits(max_connections=64))
