from collections.abc import Callable

import torch

from memshare.engine.sequence import Sequence
from memshare.outputs import Logprob


def _candidates(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, top-k, top-p and min-p on [B, V] logits, vectorized over the batch.

    Returns (probs [B, C], token ids [B, C]) over the C most likely tokens, zero where a filter drops one;
    ids is None when no row uses top-k or top-p (then C = V in vocabulary order). C starts at 64 and grows
    eightfold until it holds every row's top-p mass, so nothing is sorted over the whole vocabulary (a full
    sort of 64 x 151k logits costs more than the model's forward pass on a CPU).
    """
    params = [s.params for s in seqs]
    vocab = logits.shape[1]
    temps = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
    probs = (logits / temps.unsqueeze(1)).softmax(dim=1)
    min_ps = torch.tensor([p.min_p for p in params], device=logits.device).unsqueeze(1)
    if all(p.top_k == 0 and p.top_p == 1 for p in params):
        return probs.masked_fill(probs < probs.max(dim=1, keepdim=True).values * min_ps, 0.0), None
    top_ks = torch.tensor([p.top_k or vocab for p in params], device=logits.device).clamp(max=vocab)
    top_ps = torch.tensor([p.top_p for p in params], device=logits.device)
    num = vocab if ((top_ks == vocab) & (top_ps == 1)).any() else min(max([64] + [p.top_k for p in params]), vocab)
    values, ids = probs.topk(num, dim=1)
    while num < vocab and (values.sum(dim=1) < top_ps).any():
        num = min(num * 8, vocab)
        values, ids = probs.topk(num, dim=1)
    rank = torch.arange(num, device=logits.device).unsqueeze(0)
    drop = rank >= top_ks.unsqueeze(1)
    # top-p acts on the top-k renormalized; a token goes when the mass strictly before it reaches top_p.
    kept = values.masked_fill(drop, 0.0)
    total = torch.where(top_ks < vocab, kept.sum(dim=1), torch.ones_like(top_ps))
    drop |= (kept.cumsum(dim=1) - kept) / total.unsqueeze(1) >= top_ps.unsqueeze(1)
    drop |= values < values[:, :1] * min_ps
    # Every filter keeps a prefix of the sorted candidates: trim to the longest one.
    width = int((~drop).sum(dim=1).max())
    return values[:, :width].masked_fill(drop[:, :width], 0.0), ids[:, :width]


def _sample_rows(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Inverse-CDF sampling, one uniform draw per row; a seeded sequence draws from its own generator.

    One draw per step whatever the number of kept candidates keeps a seeded stream aligned even when
    numerics of another batch shape move a token across the top-p boundary.
    """
    uniform = torch.rand(len(seqs), 1, device=probs.device)
    for row, seq in enumerate(seqs):
        if seq.generator is not None:
            uniform[row] = torch.rand(1, generator=seq.generator, device=probs.device)
    cdf = probs.cumsum(dim=1)
    index = (cdf < uniform * cdf[:, -1:]).sum(dim=1)
    # Never land on a dropped (zero-probability) token past the last kept one.
    last_kept = probs.shape[1] - 1 - (probs.flip(1) > 0).float().argmax(dim=1)
    return torch.minimum(index, last_kept)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence],
              decode: Callable[[int], str]) -> list[dict[int, Logprob] | None]:
    logprobs = logits.log_softmax(dim=1)
    chosen = logprobs.gather(1, tokens.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=1) + 1
    result: list[dict[int, Logprob] | None] = []
    for row, seq in enumerate(seqs):
        k = seq.params.logprobs
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


def _apply_processors(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    for row, seq in enumerate(seqs):
        for processor in seq.params.logits_processors:
            logits[row] = processor(seq.output_token_ids, logits[row])
    return logits


class Sampler:
    """Turns the last-position logits of each sequence into its next token (and logprobs on request)."""

    def __init__(self, eos_token_ids: set[int], decode: Callable[[int], str]) -> None:
        self.eos_token_ids = sorted(eos_token_ids)
        self.decode = decode

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list]:
        logits = self._suppress_stops_before_min_tokens(_apply_processors(logits.float(), seqs), seqs)
        forced = [s.params.forced_token_ids[s.num_output_tokens] if s.params.forced_token_ids else -1 for s in seqs]
        forced_ids = torch.tensor(forced, device=logits.device)
        greedy = torch.tensor([s.params.greedy for s in seqs], device=logits.device)
        if min(forced) >= 0:
            tokens = forced_ids
        elif greedy.all():
            tokens = logits.argmax(dim=1)
        else:
            probs, ids = _candidates(logits, seqs)
            sampled = _sample_rows(probs, seqs)
            if ids is not None:
                sampled = ids.gather(1, sampled.unsqueeze(1)).squeeze(1)
            tokens = torch.where(greedy, logits.argmax(dim=1), sampled)
        tokens = torch.where(forced_ids >= 0, forced_ids, tokens)
        logprobs = [None] * len(seqs)
        if any(s.params.logprobs is not None for s in seqs):
            logprobs = _logprobs(logits, tokens, seqs, self.decode)
        return tokens.tolist(), logprobs

    def _suppress_stops_before_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        for row, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens:
                banned = seq.params.stop_token_ids + ([] if seq.params.ignore_eos else self.eos_token_ids)
                logits[row, banned] = float("-inf")
        return logits
