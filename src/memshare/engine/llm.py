import itertools
import logging
import os
from typing import Any

from tqdm import tqdm

from memshare.config import EngineConfig
from memshare.engine.llm_engine import LLMEngine
from memshare.outputs import RequestOutput
from memshare.sampling_params import SamplingParams

logger = logging.getLogger("memshare")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s memshare: %(message)s", "%H:%M:%S"))
    logger.addHandler(_handler)
    logger.setLevel(os.environ.get("MEMSHARE_LOGGING_LEVEL", "INFO"))
    logger.propagate = False

Prompt = str | list[int] | dict[str, Any]


class LLM:
    """Offline inference with a paged KV cache, in the shape of `vllm.LLM`.

    >>> llm = LLM(model="smollm2-135m", kv_cache_memory="1GiB")
    >>> outs = llm.generate(["Solve 12*13."], SamplingParams(temperature=0, max_tokens=64))

    `model` is a registered short name, a Hugging Face model directory, or a .gguf file; a config-only name
    (`tiny-qwen2`, `r1-distill-qwen-7b`, ...) runs with `load_format="dummy", skip_tokenizer_init=True`. Other keyword
    arguments are `EngineConfig` fields (kv_cache_memory, num_kv_blocks, kv_cache_dtype, block_size, max_num_seqs, ...);
    `share=MemShareConfig(step_threshold=0.9, block_threshold=0.8)` turns on MemShare; any registered
    policy's config (`share_config("h2o", kv_budget=0.5)`) selects that policy.
    """

    def __init__(self, model: str = "smollm2-135m", **kwargs: Any) -> None:
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._request_ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def stats(self) -> dict[str, float | int]:
        """KV blocks total / used / peak, preemptions, prefix-cache hits, token counts, tokens/s, and sharing.

        Sharing: blocks_shared (share operations), stage1_candidates (step pairs passing stage 1),
        stage2_pairs (block pairs compared in stage 2), affected_ratio (shared entries / generated-region
        blocks of finished requests), memory_saved_peak / _mean (1 - physical / logical blocks, at the peak
        and averaged over steps), sharing_time_s and sharing_time_share (of engine time).
        """
        return self.llm_engine.get_stats()

    def kv_history(self) -> list[tuple[float, int, int, int]]:
        """(engine seconds, physical KV blocks, blocks without sharing, running sequences) over the run, at most
        ~1,000 evenly strided samples."""
        return self.llm_engine.kv_history()

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for each prompt (text, token ids, or {"prompt_token_ids": [...]}) in input order.

        Every request is validated before any is queued: a bad one raises and nothing runs.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = [self._token_ids(p) if isinstance(p, dict) else p for p in prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        engine = self.llm_engine
        encoded = [engine.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for token_ids, p in zip(encoded, params_list):
            engine.validate(token_ids, p)
        ids = [f"gen-{next(self._request_ids)}" for _ in prompts]
        for request_id, prompt, token_ids, p in zip(ids, prompts, encoded, params_list):
            engine.add_request(request_id, prompt if isinstance(prompt, str) else token_ids, p, token_ids)
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.llm_engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat applies the tokenizer's chat template; skip_tokenizer_init=True loads no tokenizer: "
                             "use generate with token ids")
        prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True,
                                                 **(chat_template_kwargs or {})) for c in conversations]
        token_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate([{"prompt_token_ids": t} for t in token_ids], sampling_params, use_tqdm)

    @staticmethod
    def _token_ids(prompt: dict[str, Any]) -> list[int]:
        if "prompt_token_ids" not in prompt:
            raise ValueError("a dict prompt needs 'prompt_token_ids'")
        return list(prompt["prompt_token_ids"])

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while len(results) < len(request_ids):
                if not engine.has_unfinished_requests():
                    raise RuntimeError("engine stopped with requests unfinished")
                for output in engine.step():
                    results[output.request_id] = output
                    bar.update(1)
                bar.set_postfix_str(f"{engine.get_stats()['generation_tokens_per_s']:.1f} tok/s", refresh=False)
        finally:
            bar.close()
            for request_id in request_ids:
                if request_id not in results:
                    engine.abort_request(request_id)
        return [results[r] for r in request_ids]
