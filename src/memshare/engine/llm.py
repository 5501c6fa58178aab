import itertools
import logging
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from memshare.engine.llm_engine import LLMEngine
from memshare.engine.vllm_options import engine_config
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

    `model` is a registered short name, a Hugging Face model directory, a .gguf file, or a Hugging Face Hub id
    (downloaded through huggingface_hub's cache; HF_HUB_OFFLINE=1 reads the cache only); a config-only name
    (`tiny-qwen2`, `r1-distill-qwen-7b`, ...) runs with `load_format="dummy", skip_tokenizer_init=True`. Other keyword
    arguments are `EngineConfig` fields (kv_cache_memory, num_kv_blocks, kv_cache_dtype, block_size, max_num_seqs,
    seed, tokenizer, ...) or vLLM's names of them; a vLLM option memshare lacks raises UnsupportedOptionError saying
    what to use instead. `chat_template` is `chat`'s default template (a Jinja string or a file).
    `share=MemShareConfig(step_threshold=0.9, block_threshold=0.8)` turns on MemShare; any registered
    policy's config (`share_config("h2o", kv_budget=0.5)`) selects that policy.
    """

    def __init__(self, model: str = "smollm2-135m", chat_template: str | Path | None = None, **kwargs: Any) -> None:
        self.llm_engine = LLMEngine(engine_config(model, **kwargs))
        self.chat_template = _template(chat_template)
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

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | Path | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Apply a chat template (`chat_template`, else the LLM's, else the model's) to one conversation or a list of
        them, then generate, as vLLM's `LLM.chat`: `add_generation_prompt` opens the assistant's turn,
        `continue_final_message` continues the last message instead (not both); `tools` and `chat_template_kwargs`
        reach the template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.llm_engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat applies the tokenizer's chat template; skip_tokenizer_init=True loads no tokenizer: "
                             "use generate with token ids")
        if add_generation_prompt and continue_final_message:
            raise ValueError("chat: continue_final_message=True continues the last message; pass "
                             "add_generation_prompt=False with it")
        template_kwargs = {"add_generation_prompt": add_generation_prompt,
                           "continue_final_message": continue_final_message, **(chat_template_kwargs or {})}
        template = _template(chat_template) or self.chat_template
        prompts = [tokenizer.apply_chat_template(c, tokenize=False, chat_template=template, tools=tools,
                                                 **template_kwargs) for c in conversations]
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


def _template(template: str | Path | None) -> str | None:
    """A chat template given as Jinja text or as a file's path, told apart as vLLM does (by Jinja's characters)."""
    if template is None or any(c in str(template) for c in "{}\n"):
        return None if template is None else str(template)
    return Path(template).read_text()
