"""OpenAI requests to engine requests, and engine outputs to OpenAI responses and stream chunks."""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from itertools import accumulate

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from memshare.config import ServerConfig
from memshare.entrypoints.openai.async_engine import AsyncLLM
from memshare.entrypoints.openai.metrics import ServerMetrics
from memshare.entrypoints.openai.protocol import APIError, ChatCompletionRequest, CompletionRequest
from memshare.errors import MemShareError
from memshare.outputs import CompletionOutput, Logprob, RequestOutput
from memshare.sampling_params import SamplingParams


@dataclass(slots=True)
class _Job:
    """One OpenAI request as engine requests: a prompt per engine request, `n` samples each."""

    kind: str  # "text_completion" or "chat.completion"
    id: str
    prompts: list[list[int]]
    n: int
    params: list[SamplingParams]
    top_logprobs: int | None
    include_usage: bool
    stream: bool
    created: int


class _TextDelta:
    """A sample's text as it streams, decoded token by token (linear in the output, however long the chain of
    thought): holds back what a stop string may still cut; the final chunk comes from the engine's text."""

    __slots__ = ("decoder", "tokenizer", "holdback", "pending", "num_sent_chars", "num_tokens", "done")

    def __init__(self, params: SamplingParams, tokenizer: Tokenizer) -> None:
        # DecodeStream returns None until a multi-byte character is complete, so no U+FFFD is ever sent.
        self.decoder, self.tokenizer = DecodeStream(skip_special_tokens=True), tokenizer
        self.holdback = max((len(s) for s in params.stop_strings), default=1) - 1
        self.pending, self.num_sent_chars, self.num_tokens, self.done = "", 0, 0, False

    def advance(self, sample: CompletionOutput) -> tuple[str, int]:
        """The text to send for this snapshot, and the index of its first token."""
        first, finished = self.num_tokens, sample.finish_reason is not None
        if finished:
            delta = sample.text[self.num_sent_chars:]
        else:
            for token in sample.token_ids[first:]:
                self.pending += self.decoder.step(self.tokenizer, token) or ""
            cut = max(len(self.pending) - self.holdback, 0)
            delta, self.pending = self.pending[:cut], self.pending[cut:]
        self.num_sent_chars += len(delta)
        self.num_tokens, self.done = len(sample.token_ids), finished
        return delta, first


class OpenAIServing:
    def __init__(self, llm: AsyncLLM, config: ServerConfig, model_name: str, metrics: ServerMetrics) -> None:
        self.llm, self.config, self.model_name, self.metrics = llm, config, model_name, metrics
        self.tokenizer = llm.tokenizer
        self.created = int(time.time())

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "memshare", "max_model_len": self.llm.max_model_len}]}

    # ---- requests -> engine requests

    def completion_job(self, body: CompletionRequest) -> _Job:
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        token_ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        max_tokens = body.max_tokens or min(16, self.config.max_tokens_limit)  # OpenAI's default, within our limit
        return self._job("text_completion", "cmpl", body, token_ids, max_tokens, body.logprobs)

    def chat_job(self, body: ChatCompletionRequest) -> _Job:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # a template may reject a role order, e.g. two system messages
            raise APIError(400, f"messages do not fit the model's chat template: {error}", "messages") from error
        token_ids = [self.tokenizer.encode(text, add_special_tokens=False)]
        max_tokens = body.max_completion_tokens or body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        return self._job("chat.completion", "chatcmpl", body, token_ids, max_tokens, top)

    def _job(self, kind: str, prefix: str, body: CompletionRequest | ChatCompletionRequest,
             prompts: list[list[int]], max_tokens: int | None, top_logprobs: int | None) -> _Job:
        self._check_model(body.model)
        limit, n = self.config.max_tokens_limit, body.n
        if n > self.config.max_n:
            raise APIError(400, f"n={n} exceeds this server's limit of {self.config.max_n}", "n")
        for name in ("max_tokens", "max_completion_tokens"):  # both, though chat uses the second when given
            value = getattr(body, name, None)
            if value is not None and value > limit:
                raise APIError(400, f"{name}={value} exceeds this server's limit of {limit}", name)
        params = [self._params(body, len(p), max_tokens, top_logprobs) for p in prompts]
        for p, sampling in zip(prompts, params):
            try:
                self.llm.engine.validate(p, sampling)
            except (MemShareError, ValueError) as error:
                raise APIError(400, str(error), "prompt" if kind == "text_completion" else "messages") from error
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _Job(kind, f"{prefix}-{uuid.uuid4().hex}", prompts, n, params, top_logprobs, include_usage,
                    body.stream, int(time.time()))

    def _params(self, body: CompletionRequest | ChatCompletionRequest, prompt_len: int, max_tokens: int | None,
                top_logprobs: int | None) -> SamplingParams:
        context = self.llm.max_model_len
        if max_tokens is not None and prompt_len + max_tokens > context:
            raise APIError(400, f"this model's context is {context} tokens; the prompt has {prompt_len} and "
                           f"max_tokens asks for {max_tokens} more", "max_tokens")
        if max_tokens is None:
            max_tokens = max(1, min(self.config.max_tokens_limit, context - prompt_len))
        try:
            return SamplingParams(n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                  min_p=body.min_p, presence_penalty=body.presence_penalty,
                                  frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
                                  seed=body.seed, stop=body.stop, stop_token_ids=body.stop_token_ids,
                                  max_tokens=max_tokens, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
                                  logprobs=top_logprobs)
        except ValueError as error:  # "SamplingParams.<name> must be ...": the name is the request's parameter
            message = str(error).removeprefix("SamplingParams.")
            raise APIError(400, message, message.split(" ", 1)[0]) from error

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                           "model", "model_not_found")

    # ---- engine outputs -> responses

    async def outputs(self, job: _Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Snapshots of all the job's engine requests, tagged with the prompt index; aborts all when left early."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, prompt: list[int], params: SamplingParams) -> None:
            try:
                async for output in self.llm.generate(f"{job.id}-{index}", prompt, params, job.stream):
                    merged.put_nowait((index, output))
            except Exception as error:
                merged.put_nowait((index, error))

        tasks = [asyncio.create_task(pump(i, p, s)) for i, (p, s) in enumerate(zip(job.prompts, job.params))]
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await merged.get()
                if isinstance(item, Exception):
                    raise item
                remaining -= item.finished
                if item.finished:
                    self.metrics.observe(item)
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def response(self, job: _Job, finals: dict[int, RequestOutput]) -> dict:
        choices = []
        for index, output in sorted(finals.items()):
            for sample in output.outputs:
                choice_index = index * job.n + sample.index
                logprobs = self._logprobs(job, sample, 0, len(sample.token_ids))
                if job.kind == "chat.completion":
                    choices.append({"index": choice_index, "message": {"role": "assistant", "content": sample.text},
                                    "logprobs": logprobs, "finish_reason": sample.finish_reason})
                else:
                    choices.append({"index": choice_index, "text": sample.text, "logprobs": logprobs,
                                    "finish_reason": sample.finish_reason})
        return {**self._header(job, job.kind), "choices": choices, "usage": self._usage(job, finals.values())}

    async def stream(self, job: _Job, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        """Server-sent events: a chunk per choice whenever its text grows or it finishes, then usage and [DONE]."""
        kind = "chat.completion.chunk" if job.kind == "chat.completion" else "text_completion"
        deltas: dict[int, _TextDelta] = {}
        finals: dict[int, RequestOutput] = {}
        try:
            async with aclosing(outputs):
                async for index, output in outputs:
                    if output.finished:
                        finals[index] = output
                    for sample in output.outputs:
                        choice = self._chunk_choice(job, index, sample, deltas)
                        if choice is not None:
                            yield _sse({**self._header(job, kind), "choices": [choice]})
        except APIError as error:
            yield _sse(error.body())
        except Exception as error:
            yield _sse(APIError(500, f"generation failed: {error}").body())
        else:
            if job.include_usage:
                yield _sse({**self._header(job, kind), "choices": [], "usage": self._usage(job, finals.values())})
        yield "data: [DONE]\n\n"

    def _chunk_choice(self, job: _Job, index: int, sample: CompletionOutput,
                      deltas: dict[int, _TextDelta]) -> dict | None:
        choice_index = index * job.n + sample.index
        first_chat_chunk = choice_index not in deltas and job.kind == "chat.completion"
        if choice_index not in deltas:
            deltas[choice_index] = _TextDelta(job.params[index], self.tokenizer.backend_tokenizer)
        delta = deltas[choice_index]
        if delta.done:
            return None
        new_text, first_token = delta.advance(sample)
        if not new_text and not delta.done and not first_chat_chunk:
            return None
        logprobs = self._logprobs(job, sample, first_token, len(sample.token_ids))
        if job.kind == "chat.completion":
            message = {"role": "assistant", "content": new_text} if first_chat_chunk else {"content": new_text}
            return {"index": choice_index, "delta": message, "logprobs": logprobs,
                    "finish_reason": sample.finish_reason}
        return {"index": choice_index, "text": new_text, "logprobs": logprobs, "finish_reason": sample.finish_reason}

    def _header(self, job: _Job, kind: str) -> dict:
        return {"id": job.id, "object": kind, "created": job.created, "model": self.model_name}

    @staticmethod
    def _usage(job: _Job, finals: Iterable[RequestOutput]) -> dict:
        prompt = sum(len(p) for p in job.prompts)
        completion = sum(len(s.token_ids) for output in finals for s in output.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _logprobs(self, job: _Job, sample: CompletionOutput, start: int, stop: int) -> dict | None:
        if job.top_logprobs is None or sample.logprobs is None:
            return None
        steps = [(token, entries) for token, entries in zip(sample.token_ids[start:stop], sample.logprobs[start:stop])]
        if job.kind == "chat.completion":
            return {"content": [_chat_logprob(token, entries, job.top_logprobs) for token, entries in steps]}
        tokens = [entries[token].decoded_token or "" for token, entries in steps]
        return {"tokens": tokens, "token_logprobs": [entries[token].logprob for token, entries in steps],
                "top_logprobs": [{e.decoded_token or "": e.logprob for e in _top(entries, job.top_logprobs + 1)}
                                 for _, entries in steps],
                "text_offset": list(accumulate((len(t) for t in tokens[:-1]), initial=0))[:len(tokens)]}


def _top(entries: dict[int, Logprob], k: int) -> list[Logprob]:
    return sorted(entries.values(), key=lambda e: -e.logprob)[:k]


def _chat_logprob(token: int, entries: dict[int, Logprob], k: int) -> dict:
    def item(entry: Logprob) -> dict:
        text = entry.decoded_token or ""
        return {"token": text, "logprob": entry.logprob, "bytes": list(text.encode())}
    return {**item(entries[token]), "top_logprobs": [item(e) for e in _top(entries, k)]}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
