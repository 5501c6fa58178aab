"""`memshare calibrate`: measure a model's stage-2 similarity scale and propose a `block_threshold`.

The model answers a few problems; each answer is then fed back as `prompt + answer + filler + answer`, with
the filler aligning the second copy to the block grid, so every block of the copy has an exact-repeat twin.
With all probes prefilled in the cache at once, three kinds of block pairs are scored by the same stage-2
measure the sharing policy uses: true repeats (a block and its twin), random earlier blocks of the same
request, and blocks of other requests. The proposed threshold is the lowest at which unrelated pairs are
shared at most `max_false_share` of the time.
"""

import random
from dataclasses import dataclass

import numpy as np
import torch

from memshare.engine.llm_engine import LLMEngine
from memshare.engine.sequence import Sequence
from memshare.sampling_params import SamplingParams
from memshare.sharing.stage2 import block_similarity, read_blocks

HOLD_TOKENS = 16


@dataclass(slots=True)
class Calibration:
    repeats: list[float]
    unrelated_same_request: list[float]
    unrelated_other_requests: list[float]
    block_threshold: float
    false_share_rate: float
    repeat_recall: float

    def summary(self) -> str:
        def row(name: str, values: list[float]) -> str:
            p = np.percentile(values, [1, 10, 50, 90, 99]) if values else [float("nan")] * 5
            return (f"{name:<28}{len(values):>7}  " + "  ".join(f"{v:.3f}" for v in p)
                    + f"  {max(values, default=float('nan')):.3f}")

        return "\n".join([
            f"{'block pairs':<28}{'n':>7}  p1     p10    p50    p90    p99    max",
            row("exact repeats", self.repeats),
            row("unrelated, same request", self.unrelated_same_request),
            row("unrelated, other requests", self.unrelated_other_requests),
            "",
            f"proposed block_threshold {self.block_threshold:.2f}: false-share rate among unrelated pairs "
            f"{self.false_share_rate:.2%}, exact repeats shared {self.repeat_recall:.1%}",
        ])


def propose_threshold(unrelated: list[float], repeats: list[float], max_false_share: float) -> tuple[float, ...]:
    """Lowest threshold on a 0.01 grid whose false-share rate among unrelated pairs is <= max_false_share."""
    scores = np.asarray(unrelated)
    for threshold in np.round(np.arange(0.0, 1.0001, 0.01), 2):
        false_share = float((scores >= threshold).mean()) if scores.size else 0.0
        if false_share <= max_false_share:
            recall = float((np.asarray(repeats) >= threshold).mean()) if repeats else 0.0
            return float(threshold), false_share, recall
    return 1.0, 0.0, 0.0


def probe_tokens(prompt: list[int], answer: list[int], filler: int, block_size: int) -> tuple[list[int], int]:
    """prompt + answer + filler + answer, the second copy shifted a whole number of blocks; returns the shift."""
    pad = -len(answer) % block_size
    return prompt + answer + [filler] * pad + answer, len(answer) + pad


def score(engine: LLMEngine, pairs: list[tuple[Sequence, int, Sequence, int]], metric: str) -> list[float]:
    """Stage-2 similarity (`metric`) of (sequence, block index) pairs, batched."""
    bm, bs = engine.block_manager, engine.block_manager.block_size
    out: list[float] = []
    for start in range(0, len(pairs), 64):
        batch = pairs[start : start + 64]
        left = read_blocks(bm, engine.model_runner.unrotate_keys, [s.block_table[i] for s, i, _, _ in batch],
                           [i * bs for _, i, _, _ in batch])
        right = read_blocks(bm, engine.model_runner.unrotate_keys, [s.block_table[j] for _, _, s, j in batch],
                            [j * bs for _, _, _, j in batch])
        similarity = block_similarity(left[0], left[1], right[0], right[1], metric)
        out += torch.diagonal(similarity).tolist()
    return out


def calibrate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = 256, max_false_share: float = 0.01,
              seed: int = 0, metric: str = "euclidean") -> Calibration:
    """Run the calibration on `engine` (a dense one) with chat-templated problem prompts, for the stage-2
    `metric` ("euclidean", or the "cosine" ablation)."""
    rng = random.Random(seed)
    bm = engine.block_manager
    bs = bm.block_size
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens)
    answers = []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"calibrate-answer-{i}", prompt, greedy)
    while engine.has_unfinished_requests():
        answers += engine.step()
    answers.sort(key=lambda o: int(o.request_id.rsplit("-", 1)[1]))
    filler = engine.tokenizer.encode("\n", add_special_tokens=False)[0]
    probes: list[tuple[Sequence, int, int]] = []  # (sequence, first block of the copy, shift in blocks)
    hold = SamplingParams(temperature=0, max_tokens=HOLD_TOKENS, ignore_eos=True)
    free = bm.num_free_blocks
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        tokens, shift = probe_tokens(prompt, answer.outputs[0].token_ids, filler, bs)
        # Every probe must stay in the cache until all are prefilled: admit only what fits without preemption.
        need = bm.blocks_needed(len(tokens) + HOLD_TOKENS)
        if shift < bs or len(tokens) + HOLD_TOKENS >= engine.max_model_len or need > free:
            continue
        free -= need
        engine.add_request(f"calibrate-probe-{i}", tokens, hold)
        seq = engine.sequences(f"calibrate-probe-{i}")[0]
        probes.append((seq, bm.blocks_needed(len(prompt) + shift), shift // bs))
    if len(probes) < 2:
        raise ValueError(f"only {len(probes)} calibration probe(s) fit the KV cache: raise kv_cache_memory "
                         "or lower max_tokens")
    while any(seq.num_output_tokens == 0 for seq, _, _ in probes):
        engine.step()
    repeats, same, other = [], [], []
    for n, (seq, first_copy_block, shift) in enumerate(probes):
        copy_blocks = range(first_copy_block, seq.num_prompt_tokens // bs)
        repeats_pairs = [(seq, b, seq, b - shift) for b in copy_blocks]
        repeats += score(engine, repeats_pairs, metric)
        same_pairs = [(seq, b, seq, j) for b in copy_blocks if (j := rng.randrange(b)) != b - shift]
        same += score(engine, same_pairs, metric)
        others = [o for m, (o, _, _) in enumerate(probes) if m != n]
        other_pairs = []
        for b in copy_blocks:
            o = rng.choice(others)
            other_pairs.append((seq, b, o, rng.randrange(o.num_prompt_tokens // bs)))
        other += score(engine, other_pairs, metric)
    for seq, _, _ in probes:
        engine.abort_request(seq.request_id)
    threshold, false_share, recall = propose_threshold(same + other, repeats, max_false_share)
    return Calibration(repeats, same, other, threshold, false_share, recall)
