"""Any OpenAI-compatible ``/chat/completions`` server (vLLM's, SGLang, a hosted API): async requests with bounded
concurrency, a timeout, and the factory's one retry policy (pathgen.errors.async_retrying: exponential backoff with
jitter, the server's Retry-After honoured) on 408, 409, 429, 5xx and dropped connections. When those retries are
spent, or the server answers in a way no retry can fix (401, 403, 404, a malformed body), the batch raises
BackendError naming the endpoint, caused by the last failure: infrastructure, never a caption failure. A request the
server rejects for its content (400, 413, 422) is that request's error reply. The API key comes from the environment
(PATHGEN_OPENAI_API_KEY or OPENAI_API_KEY) and never appears in an error; nor do credentials written into the
URL (``https://user:secret@host/v1``): messages name the endpoint as ``https://***@host/v1``."""

from __future__ import annotations

import asyncio
import threading

import httpx

from agents.backends.messages import openai_messages
from agents.openai_http import attempts_note, auth_headers, failure_name, worth_retrying
from agents.protocol import ChatReply, ChatRequest, Sampling
from pathgen.errors import BackendError, RetryableStatus, async_retrying, redact_urls, without_userinfo

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
CONTENT_STATUS = {400, 413, 422}  # the server refuses this request's content; other requests may pass


class OpenAIBackend:
    name = "openai"
    random_weights = False

    def __init__(
        self,
        base_url: str,
        model_id: str,
        concurrency: int = 16,
        timeout: float = 120.0,
        retries: int = 4,
        max_image_pixels: int = 672 * 672,
        backoff_seconds: float = 1.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.endpoint = without_userinfo(self.base_url)  # what messages show: never the URL's credentials
        self.model_id = model_id
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.max_image_pixels = max_image_pixels
        self.backoff_seconds = backoff_seconds

    def generate(self, requests: list[ChatRequest], sampling: Sampling) -> list[ChatReply]:
        coroutine = self._generate_all(requests, sampling)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coroutine)
        # Called from inside an event loop (a notebook, an async flow): run ours in a thread of its own.
        result: list[list[ChatReply]] = []
        thread = threading.Thread(target=lambda: result.append(asyncio.run(coroutine)))
        thread.start()
        thread.join()
        return result[0]

    async def _generate_all(self, requests: list[ChatRequest], sampling: Sampling) -> list[ChatReply]:
        headers = auth_headers()
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        gate = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(timeout=self.timeout, headers=headers, limits=limits) as client:

            async def one(request: ChatRequest) -> ChatReply:
                async with gate:
                    return await self._one(client, request, sampling)

            return list(await asyncio.gather(*(one(r) for r in requests)))

    async def _one(self, client: httpx.AsyncClient, request: ChatRequest, sampling: Sampling) -> ChatReply:
        body = {
            "model": self.model_id,
            "messages": openai_messages(request, self.max_image_pixels),
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
            "seed": request.seed_or(sampling),  # the item's own seed: its reply never depends on its batch
        }
        policy = async_retrying(retries=self.retries, backoff_seconds=self.backoff_seconds, retry_on=worth_retrying)
        try:
            response = await policy(self._post, client, body)
        except (httpx.TransportError, RetryableStatus) as exc:
            raise BackendError(
                f"the model server at {self.endpoint} failed: {failure_name(exc)}"
                f"{attempts_note(exc, self.retries + 1)}; the slides stay pending"
            ) from exc
        return self._reply(response)

    async def _post(self, client: httpx.AsyncClient, body: dict) -> httpx.Response:
        """One attempt; an answer worth asking again (RETRY_STATUS) is raised for the retry policy."""
        response = await client.post(f"{self.base_url}/chat/completions", json=body)
        if response.status_code in RETRY_STATUS:
            raise RetryableStatus.of(response.status_code, response.headers)
        return response

    def _reply(self, response: httpx.Response) -> ChatReply:
        """The reply of a final answer: the text, the request's error reply (CONTENT_STATUS), or BackendError."""
        if response.status_code in CONTENT_STATUS:
            return ChatReply(
                None, f"HTTP {response.status_code} from {self.endpoint}: {redact_urls(response.text[:200])}"
            )
        if response.status_code != 200:
            raise BackendError(
                f"the model server at {self.endpoint} answered HTTP {response.status_code} for model "
                f"{self.model_id!r}; check the model name and the API key"
            )
        try:
            choice = response.json()["choices"][0]
            return ChatReply(choice["message"].get("content") or "", None, choice.get("finish_reason"))
        except (ValueError, KeyError, IndexError) as exc:
            raise BackendError(
                f"malformed reply from the model server at {self.endpoint} ({type(exc).__name__})"
            ) from None
