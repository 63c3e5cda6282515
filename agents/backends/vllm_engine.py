"""The vLLM backend: one offline ``vllm.LLM`` engine per worker process, a whole batch per ``LLM.chat`` call,
images as image parts, prefix caching on (the shared instructions come before the image), bounded image pixels
and context length. vllm lives in the ``gpu`` extra and is imported only when this backend is built."""

from __future__ import annotations

from agents.backends.messages import openai_messages
from agents.backends.weights import folder_random_weights
from agents.protocol import ChatReply, ChatRequest, Sampling
from pathgen.errors import BackendError
from pathgen.settings import AgentsSettings


def engine_arguments(model_id: str, agents: AgentsSettings, revision: str | None = None) -> dict:
    return {
        "model": model_id,
        "revision": revision,
        "enable_prefix_caching": True,
        "max_model_len": agents.vllm_max_model_len,
        "gpu_memory_utilization": agents.vllm_gpu_memory_utilization,
        "tensor_parallel_size": agents.vllm_tensor_parallel_size,
        "limit_mm_per_prompt": {"image": 1},
    }


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_id: str, agents: AgentsSettings, revision: str | None = None) -> None:
        from vllm import LLM

        self.model_id = model_id
        # A local folder tells whether it holds trained weights (a tiny model copied under another name does not).
        self.random_reason = folder_random_weights(model_id)
        self.random_weights = self.random_reason is not None
        self.max_image_pixels = agents.max_image_pixels
        self.llm = LLM(**engine_arguments(model_id, agents, revision))

    def conversations(self, requests: list[ChatRequest]) -> list[list[dict]]:
        return [openai_messages(r, self.max_image_pixels) for r in requests]

    def sampling_params(self, requests: list[ChatRequest], sampling: Sampling) -> list:
        """One SamplingParams per request (LLM.chat pairs a list with its conversations one by one), each with the
        request's own seed: an item's reply never depends on the batch it shares."""
        from vllm import SamplingParams

        return [
            SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=request.seed_or(sampling),
            )
            for request in requests
        ]

    def generate(self, requests: list[ChatRequest], sampling: Sampling) -> list[ChatReply]:
        if self.llm is None:
            raise BackendError(f"the vLLM engine for {self.model_id} was shut down at the end of its stage")
        try:
            params = self.sampling_params(requests, sampling)
            outputs = self.llm.chat(self.conversations(requests), params, use_tqdm=False)
        except Exception as exc:  # an engine or CUDA error is infrastructure: nothing is committed, work stays pending
            raise BackendError(
                f"the vLLM engine for {self.model_id} failed on a batch: {type(exc).__name__}: {exc}"
            ) from exc
        replies = []
        for output in outputs:
            completion = output.outputs[0]
            replies.append(ChatReply(completion.text.strip(), None, completion.finish_reason))
        return replies

    def close(self) -> None:
        """Shut the engine down and give its GPU memory (weights, KV cache) back: the next stage needs it."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        shutdown = getattr(llm, "shutdown", None)  # LLM.shutdown() where this vLLM has it
        if callable(shutdown):
            shutdown()
        del llm
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        except ImportError:
            return
        cleanup_dist_env_and_memory()
