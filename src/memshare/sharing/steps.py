"""Reasoning-step boundaries over token ids: a blank line, or a new line that opens with a reflection cue."""

import re
from collections.abc import Callable
from dataclasses import dataclass

from memshare.sharing.configs import MemShareConfig


@dataclass(slots=True)
class SplitState:
    step_start: int
    at_line_start: bool = True


class StepSplitter:
    """Feeds tokens one at a time and reports where steps end; a step shorter than `min_step_tokens` continues."""

    def __init__(self, config: MemShareConfig, decode_token: Callable[[int], str]) -> None:
        self.min_step_tokens = config.min_step_tokens
        self.split_on_blank_line = config.split_on_blank_line
        self.cue_words = {re.split(r"[\s\-']", cue, maxsplit=1)[0] for cue in config.reflection_cues}
        self._decode_token = decode_token
        self._pieces: dict[int, str] = {}

    def piece(self, token_id: int) -> str:
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self._decode_token(token_id)
        return piece

    def push(self, state: SplitState, position: int, token_id: int) -> int | None:
        """Consume the token at `position`; return the end (exclusive) of a step that finished, if one did."""
        piece = self.piece(token_id)
        long_enough = position - state.step_start >= self.min_step_tokens
        at_line_start, state.at_line_start = state.at_line_start, piece.endswith("\n")
        word = re.split(r"[\s\-',.:]", piece.strip(), maxsplit=1)[0]
        if at_line_start and long_enough and word in self.cue_words:
            state.step_start = position
            return position
        blank_line = "\n\n" in piece or (at_line_start and piece.startswith("\n"))
        if self.split_on_blank_line and blank_line and position + 1 - state.step_start >= self.min_step_tokens:
            state.step_start = position + 1
            return position + 1
        return None
