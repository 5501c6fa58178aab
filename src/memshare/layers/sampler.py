from collections.abc import Callable
from dataclasses import dataclass

import torch

from memshare.outputs import Logprob
from memshare.sampling_params import LogitsProcessor


@dataclass(slots=True)
class Penalties:
    """vLLM's repetition, presence and frequency penalties of a batch's rows, with the token ids they count: rows
    that use no penalty (and the padding) hold -1."""

    repetition: torch.Tensor  # [B] float32; 1.0: none
    presence: torch.Tensor  # [B] float32; 0.0: none
    frequency: torch.Tensor  # [B] float32; 0.0: none
    prompt_token_ids: torch.Tensor  # [B, P] int64, read by the repetition penalty only
    output_token_ids: torch.Tensor  # [B, O] int64


@dataclass(slots=True)
class SamplingBatch:
    """How to sample each row of a [B, V] logits batch: per-row tensors on the logits' device, and per-row lists for
    what runs row by row. The engine builds it from its sequences (engine/model_runner.py `sampling_batch`)."""

    temperatures: torch.Tensor  # [B] float32; 1.0 where greedy (temperature 0)
    top_ks: torch.Tensor  # [B] int64; 0: no top-k
    top_ps: torch.Tensor  # [B] float64, exactly as requested (1.0: no top-p); the filters compute in float32
    min_ps: torch.Tensor  # [B] float32; 0: no min-p
    greedy: torch.Tensor  # [B] bool
    forced_token_ids: torch.Tensor  # [B] int64: the token teacher forcing produces this step, -1 where none
    generators: list[torch.Generator | None]  # a seeded row's own generator, None where unseeded
    logprobs: list[int | None]  # top-k logprobs to return per row (0: the sampled token's only), None: none
    banned_token_ids: list[list[int]]  # tokens this step must not produce (stops before min_tokens), [] where none
    # The logits processor calls of each row, in order, each with the output token ids it receives.
    logits_processors: list[list[tuple[LogitsProcessor, list[int]]]]
    penalties: Penalties | None = None  # None where every row keeps the defaults: no work then

    def __len__(self) -> int:
        return len(self.generators)


def _candidates(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, top-k, top-p and min-p on [B, V] logits, vectorized over the batch.

    Returns (probs [B, C], token ids [B, C]) over the C most likely tokens, zero where a filter drops one;
    ids is None when no row uses top-k or top-p (then C = V in vocabulary order). C starts at 64 and grows
    eightfold until it holds every row's top-p mass, so nothing is sorted over the whole vocabulary (a full
    sort of 64 x 151k logits costs more than the model's forward pass on a CPU).
    """
    vocab = logits.shape[1]
    probs = (logits / batch.temperatures.unsqueeze(1)).softmax(dim=1)
    min_ps = batch.min_ps.unsqueeze(1)
    if bool(((batch.top_ks == 0) & (batch.top_ps == 1)).all()):
        return probs.masked_fill(probs < probs.max(dim=1, keepdim=True).values * min_ps, 0.0), None
    top_ks = torch.where(batch.top_ks == 0, vocab, batch.top_ks).clamp(max=vocab)
    top_ps = batch.top_ps.float()
    num = vocab if ((top_ks == vocab) & (top_ps == 1)).any() else min(max(64, int(batch.top_ks.max())), vocab)
    values, ids = probs.topk(num, dim=1)
    while num < vocab and (values.sum(dim=1) < top_ps).any():
        num = min(num * 8, vocab)
        values, ids = probs.topk(num, dim=1)
    rank = torch.arange(num, device=logits.device).unsqueeze(0)
    drop = rank >= top_ks.unsqueeze(1)
    # top-p acts on the top-k renormalized; a token goes when the mass strictly before it reaches top_p. The most
    # likely token always stays: a top_p that rounds to 0 in float32 would otherwise leave nothing to sample.
    kept = values.masked_fill(drop, 0.0)
    total = torch.where(top_ks < vocab, kept.sum(dim=1), torch.ones_like(top_ps))
    drop |= ((kept.cumsum(dim=1) - kept) / total.unsqueeze(1) >= top_ps.unsqueeze(1)) & (rank > 0)
    drop |= values < values[:, :1] * min_ps
    # Every filter keeps a prefix of the sorted candidates: trim to the longest one.
    width = int((~drop).sum(dim=1).max())
    return values[:, :width].masked_fill(drop[:, :width], 0.0), ids[:, :width]


def _sample_rows(probs: torch.Tensor, generators: list[torch.Generator | None],
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverse-CDF sampling, one uniform draw per row; a seeded row draws from its own generator, the others from
    `generator` (the engine's seed), or torch's global one when None.

    One draw per step whatever the number of kept candidates keeps a seeded stream aligned even when
    numerics of another batch shape move a token across the top-p boundary.
    """
    uniform = torch.rand(len(generators), 1, generator=generator, device=probs.device)
    for row, own in enumerate(generators):
        if own is not None:
            uniform[row] = torch.rand(1, generator=own, device=probs.device)
    cdf = probs.cumsum(dim=1)
    index = (cdf < uniform * cdf[:, -1:]).sum(dim=1)
    # Never land on a dropped (zero-probability) token past the last kept one.
    last_kept = probs.shape[1] - 1 - (probs.flip(1) > 0).float().argmax(dim=1)
    return torch.minimum(index, last_kept)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_ks: list[int | None],
              decode: Callable[[int], str]) -> list[dict[int, Logprob] | None]:
    logprobs = logits.log_softmax(dim=1)
    chosen = logprobs.gather(1, tokens.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=1) + 1
    result: list[dict[int, Logprob] | None] = []
    for row, k in enumerate(top_ks):
        if k is None:
            result.append(None)
            continue
        token = int(tokens[row])
        entry = {token: Logprob(float(chosen[row]), int(ranks[row]), decode(token))}
        if k:
            values, ids = logprobs[row].topk(k)
            for rank, (value, token_id) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
                entry.setdefault(token_id, Logprob(value, rank, decode(token_id)))
        result.append(entry)
    return result


def _apply_processors(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    for row, calls in enumerate(batch.logits_processors):
        for processor, output_token_ids in calls:
            logits[row] = processor(output_token_ids, logits[row])
    return logits


def _suppress_stops_before_min_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    for row, banned in enumerate(batch.banned_token_ids):
        if banned:
            logits[row, banned] = float("-inf")
    return logits


def _token_mask(token_ids: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts [B, vocab] float32, counts > 0) of each row's token ids; -1 pads."""
    ids = torch.where(token_ids < 0, vocab, token_ids)  # the padding counts in an extra column, cut off
    counts = torch.zeros(ids.shape[0], vocab + 1, device=ids.device).scatter_add_(
        1, ids, torch.ones_like(ids, dtype=torch.float32))[:, :vocab]
    return counts, counts > 0


def apply_penalties(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """vLLM's penalties on [B, V] logits: a repeated token's (seen in the prompt or the output) positive
    logit is divided by `repetition`, a negative one multiplied; then `frequency` times each token's count in the
    output and `presence` once for each token in it are subtracted."""
    vocab = logits.shape[1]
    _, in_prompt = _token_mask(penalties.prompt_token_ids, vocab)
    output_counts, in_output = _token_mask(penalties.output_token_ids, vocab)
    repetition = torch.where(in_prompt | in_output, penalties.repetition.unsqueeze(1), 1.0)
    logits = torch.where(logits > 0, logits / repetition, logits * repetition)
    return logits - penalties.frequency.unsqueeze(1) * output_counts - penalties.presence.unsqueeze(1) * in_output


class Sampler:
    """Turns the last-position logits of each row into its next token (and logprobs on request), as `batch` says:
    logits processors first, then the stop tokens banned before `min_tokens`, then the penalties, then forced,
    greedy or sampled. Unseeded rows draw from `generator` (the engine's seed), or torch's global one when None."""

    def __init__(self, decode: Callable[[int], str], generator: torch.Generator | None = None) -> None:
        self.decode = decode
        self.generator = generator

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> tuple[list[int], list]:
        logits = _suppress_stops_before_min_tokens(_apply_processors(logits.float(), batch), batch)
        if batch.penalties is not None:
            logits = apply_penalties(logits, batch.penalties)
        forced_ids, greedy = batch.forced_token_ids, batch.greedy
        if bool((forced_ids >= 0).all()):
            tokens = forced_ids
        elif greedy.all():
            tokens = logits.argmax(dim=1)
        else:
            probs, ids = _candidates(logits, batch)
            sampled = _sample_rows(probs, batch.generators, self.generator)
            if ids is not None:
                sampled = ids.gather(1, sampled.unsqueeze(1)).squeeze(1)
            tokens = torch.where(greedy, logits.argmax(dim=1), sampled)
        tokens = torch.where(forced_ids >= 0, forced_ids, tokens)
        logprobs = [None] * len(batch)
        if any(k is not None for k in batch.logprobs):
            logprobs = _logprobs(logits, tokens, batch.logprobs, self.decode)
        return tokens.tolist(), logprobs
