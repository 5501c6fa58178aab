"""MemShare: when a reasoning step finishes, share its KV blocks with similar blocks of similar earlier steps.

Per running sequence, after every engine step:
1. new tokens go through the step splitter; a finished step is scored by stage 1 (bag-of-words cosine)
   against every earlier step of the sequence, prompt steps included;
2. each full block of a step with stage-1 candidates, once its KV is computed, is compared by stage 2
   with the computed blocks of the candidate steps that come before it, all in one vectorized pass;
3. the best match at or above `block_threshold` is shared: the block manager points the entry at the
   earlier physical block and frees the duplicate. Prompt blocks and the block being written are never
   replaced; after a preemption the recomputed blocks are compared again.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from memshare.config import register_policy
from memshare.engine.policy import BlockOps, ModelAccess, PolicyRequest, SharingPolicy, first_holders
from memshare.sharing.configs import MemShareConfig
from memshare.sharing.stage1 import StepIndex, make_encoder
from memshare.sharing.stage2 import Scorer, local_scorer
from memshare.sharing.steps import SplitState, StepSplitter


@dataclass(slots=True)
class Step:
    start: int
    end: int
    candidates: list[int]  # earlier steps that passed stage 1
    next_block: int  # first block of this step not yet compared


@dataclass(slots=True)
class SeqState:
    split: SplitState
    index: StepIndex
    first_generated_block: int
    preemptions: int
    steps: list[Step] = field(default_factory=list)
    pending: list[Step] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # of the step being written
    num_seen: int = 0


class MemSharePolicy(SharingPolicy):
    def __init__(self, config: MemShareConfig, block_manager: BlockOps, model: ModelAccess,
                 scorer: Scorer | None = None) -> None:
        if model.decode is None:
            raise ValueError("memshare splits steps on decoded text; it needs a tokenizer; skip_tokenizer_init=False")
        super().__init__(config, block_manager, model)
        self.block_size = block_manager.block_size
        self.splitter = StepSplitter(config, lambda token: model.decode([token]))
        self.score = scorer or local_scorer(block_manager, model.unrotate_keys, config.stage2)
        self.encode, self.index_type = make_encoder(config, model.decode, model.embed_tokens)
        self.states: dict[int, SeqState] = {}
        self.blocks_shared = 0
        self.stage1_candidates = 0
        self.stage2_pairs = 0
        # Called with (seq, entry, source entry, stage-2 similarity) on every share when an analysis asks for it;
        # a log kept by default would grow for as long as a server runs.
        self.on_share: Callable[[PolicyRequest, int, int, float], None] | None = None

    def after_step(self, running: list[PolicyRequest]) -> None:
        for seq in running:
            state = self.states.get(seq.seq_id) or self._start(seq)
            if seq.num_preemptions != state.preemptions:
                self._rewind(state, seq.num_preemptions)
            self._split(seq, state)
            self._share(seq, state)

    def finish(self, seq: PolicyRequest) -> None:
        super().finish(seq)
        self.states.pop(seq.seq_id, None)

    def stats(self) -> dict[str, float | int]:
        return super().stats() | {"blocks_shared": self.blocks_shared, "stage1_candidates": self.stage1_candidates,
                                  "stage2_pairs": self.stage2_pairs}

    def _start(self, seq: PolicyRequest) -> SeqState:
        state = SeqState(SplitState(0), self.index_type(self.config), self.first_generated_block(seq),
                         seq.num_preemptions)
        for position in range(seq.num_prompt_tokens):
            self._push(state, position, seq.token_ids[position], generated=False)
        if state.tokens:
            self._close(state, state.split.step_start, seq.num_prompt_tokens, generated=False)
        state.split = SplitState(seq.num_prompt_tokens)
        state.num_seen = seq.num_prompt_tokens
        self.states[seq.seq_id] = state
        return state

    def _rewind(self, state: SeqState, preemptions: int) -> None:
        # A preempted sequence freed every block: its recomputed blocks are all unshared again.
        state.preemptions = preemptions
        state.pending = [step for step in state.steps if step.candidates]
        for step in state.pending:
            step.next_block = max(step.start // self.block_size, state.first_generated_block)

    def _split(self, seq: PolicyRequest, state: SeqState) -> None:
        for position in range(state.num_seen, seq.num_tokens):
            self._push(state, position, seq.token_ids[position], generated=True)
        state.num_seen = seq.num_tokens

    def _push(self, state: SeqState, position: int, token: int, generated: bool) -> None:
        start = state.split.step_start
        end = self.splitter.push(state.split, position, token)
        if end == position:
            self._close(state, start, end, generated)
        state.tokens.append(token)
        if end == position + 1:
            self._close(state, start, end, generated)

    def _close(self, state: SeqState, start: int, end: int, generated: bool) -> None:
        step = self.encode(state.tokens)
        candidates = state.index.candidates(step) if generated else []
        state.index.add(step)
        state.tokens = []
        self.stage1_candidates += len(candidates)
        step = Step(start, end, [i for i, _ in candidates], max(start // self.block_size, state.first_generated_block))
        state.steps.append(step)
        if step.candidates:
            state.pending.append(step)

    def _share(self, seq: PolicyRequest, state: SeqState) -> None:
        bs = self.block_size
        num_computed = seq.num_computed_tokens // bs
        queries: list[tuple[int, list[int]]] = []
        for step in state.pending:
            last = min(step.end // bs, num_computed)
            allowed = [b for c in map(state.steps.__getitem__, step.candidates)
                       for b in range(c.start // bs, min((c.end - 1) // bs + 1, num_computed))]
            queries += [(b, [a for a in allowed if a < b]) for b in range(step.next_block, last)]
            step.next_block = max(step.next_block, last)
        state.pending = [s for s in state.pending if s.next_block < s.end // bs]
        queries = [(b, allowed) for b, allowed in queries if allowed]
        if queries:
            self._compare_and_share(seq, queries)

    def _compare_and_share(self, seq: PolicyRequest, queries: list[tuple[int, list[int]]]) -> None:
        table = seq.block_table
        holder = first_holders(table)
        columns = sorted({holder[table[a]] for _, allowed in queries for a in allowed})
        column_of = {entry: j for j, entry in enumerate(columns)}
        entries = [b for b, _ in queries] + columns
        similarity = self.score([table[e] for e in entries], [e * self.block_size for e in entries], len(queries))
        mask = torch.zeros_like(similarity, dtype=torch.bool)
        for row, (_, allowed) in enumerate(queries):
            mask[row, [column_of[holder[table[a]]] for a in allowed]] = True
        self.stage2_pairs += int(mask.sum())
        best, best_column = similarity.masked_fill(~mask, -1.0).max(dim=1)
        for (entry, _), score, column in zip(queries, best.tolist(), best_column.tolist()):
            if score >= self.config.block_threshold:
                self.block_manager.share(seq, entry, columns[column])
                self.blocks_shared += 1
                if self.on_share is not None:
                    self.on_share(seq, entry, columns[column], score)


register_policy(MemShareConfig, MemSharePolicy, knobs=("step_threshold", "block_threshold"))
