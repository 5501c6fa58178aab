from collections.abc import Callable

import torch

from memshare.engine.sequence import Sequence
from memshare.outputs import Logprob


def _apply_filters(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on [B, V] logits, vectorized over the batch."""
    params = [s.params for s in seqs]
    temps = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
    logits = logits / temps.unsqueeze(1)
    top_ks = [p.top_k for p in params]
    if any(top_ks):
        k = torch.tensor([t or logits.shape[1] for t in top_ks], device=logits.device).clamp(max=logits.shape[1])
        kth = logits.sort(dim=1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_ps = torch.tensor([p.top_p for p in params], device=logits.device)
    if (top_ps < 1).any():
        sorted_logits, order = logits.sort(dim=1, descending=True)
        probs = sorted_logits.softmax(dim=1)
        # Drop a token when the mass strictly before it already reaches top_p; the top token always stays.
        drop = (probs.cumsum(dim=1) - probs) >= top_ps.unsqueeze(1)
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    min_ps = torch.tensor([p.min_p for p in params], device=logits.device)
    if (min_ps > 0).any():
        probs = logits.softmax(dim=1)
        threshold = probs.max(dim=1, keepdim=True).values * min_ps.unsqueeze(1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def _sample_rows(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Exponential-race sampling (argmax p/q, q ~ Exp(1)); a seeded sequence draws from its own generator."""
    noise = torch.empty_like(probs).exponential_()
    for row, seq in enumerate(seqs):
        if seq.generator is not None:
            noise[row].exponential_(generator=seq.generator)
    return (probs / noise).argmax(dim=1)


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


class Sampler:
    """Turns the last-position logits of each sequence into its next token (and logprobs on request)."""

    def __init__(self, eos_token_ids: set[int], decode: Callable[[int], str]) -> None:
        self.eos_token_ids = sorted(eos_token_ids)
        self.decode = decode

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list]:
        logits = self._suppress_stops_before_min_tokens(logits.float(), seqs)
        greedy = torch.tensor([s.params.greedy for s in seqs], device=logits.device)
        if greedy.all():
            tokens = logits.argmax(dim=1)
        else:
            probs = _apply_filters(logits, seqs).softmax(dim=1)
            tokens = torch.where(greedy, logits.argmax(dim=1), _sample_rows(probs, seqs))
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
