"""Streamed text is decoded incrementally and still equals the engine's final text, character for character."""

import pytest

from memshare import SamplingParams
from memshare.entrypoints.openai.serving import _TextDelta
from memshare.outputs import CompletionOutput

TEXT = "Café ☕ costs 3€; 日本語 and 🎉 split into bytes.\n\nNext step: naïve — done."


def _stream(tokenizer, token_ids: list[int], final_text: str, stop: list[str] | None) -> list[str]:
    """Snapshots one token apart, as the engine publishes them, then the finished one."""
    delta = _TextDelta(SamplingParams(stop=stop), tokenizer.backend_tokenizer)
    chunks = [delta.advance(CompletionOutput(0, "", token_ids[:n]))[0] for n in range(1, len(token_ids))]
    chunks.append(delta.advance(CompletionOutput(0, final_text, token_ids, finish_reason="stop"))[0])
    return chunks


def test_multibyte_characters_split_across_tokens(tokenizer):
    token_ids = tokenizer.encode(TEXT)
    assert any("\ufffd" in tokenizer.decode(token_ids[:n]) for n in range(1, len(token_ids)))
    chunks = _stream(tokenizer, token_ids, tokenizer.decode(token_ids), None)
    assert "".join(chunks) == TEXT
    assert not any("\ufffd" in c for c in chunks)
    assert sum(bool(c) for c in chunks[:-1]) > len(token_ids) // 2  # text flows before the end


@pytest.mark.parametrize("stop", [["\n\n"], ["step:", "€"]])
def test_text_a_stop_string_cuts_is_never_sent(tokenizer, stop):
    full = tokenizer.decode(tokenizer.encode(TEXT))
    cut = min(full.find(s) for s in stop)
    # The engine finishes at the token that completes the stop string and cuts the text before it.
    token_ids = tokenizer.encode(TEXT)
    end = next(n for n in range(1, len(token_ids) + 1) if any(s in tokenizer.decode(token_ids[:n]) for s in stop))
    chunks = _stream(tokenizer, token_ids[:end], full[:cut], stop)
    assert "".join(chunks) == full[:cut]
    sent = ""
    for chunk in chunks[:-1]:
        sent += chunk
        assert full[:cut].startswith(sent)
