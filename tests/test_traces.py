"""Reading trace files: logged chats that end with the assistant's reply, and errors that show the accepted shapes."""

import json
import re
from pathlib import Path

import pytest

from memshare.eval.replay import TraceFileError, read_trace_file, tokenize

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Solve 12*13."},
        {"role": "assistant", "content": "12*13 = 156."}]


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_chat_log_ending_with_the_reply_is_prompt_plus_response(tmp_path, tokenizer):
    path = write(tmp_path / "chats.jsonl", [{"id": "c", "messages": CHAT},
                                            {"messages": CHAT[1:], "response": "explicit wins"}])
    chat, explicit = read_trace_file(path)
    assert (chat.trace_id, chat.prompt, chat.response) == ("c", CHAT[:2], "12*13 = 156.")
    assert (explicit.prompt, explicit.response) == (CHAT[1:], "explicit wins")
    # rendered as any chat prompt: the turns before the reply, then the generation prompt; the reply is forced
    [trace] = tokenize(tokenizer, [chat], max_tokens=64)
    assert trace.prompt_token_ids == tokenizer.apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=True,
                                                             return_dict=False)
    assert trace.token_ids == tokenizer.encode("12*13 = 156.", add_special_tokens=False)


@pytest.mark.parametrize("line, reason", [
    ("{not json", "not JSON"),
    ({"messages": [CHAT[0], CHAT[1]]}, "no response field 'response'"),
    ({"messages": [CHAT[2]]}, "'messages' holds only the assistant's reply"),
    ({"messages": [CHAT[1], {"role": "assistant", "content": " "}]}, "the final assistant message is empty"),
    ({"answer": "x"}, "no prompt field"),
])
def test_unreadable_line_names_file_line_and_accepted_shapes(tmp_path, line, reason):
    path = write(tmp_path / "t.jsonl", [{"messages": CHAT}, line])
    with pytest.raises(TraceFileError) as error:
        read_trace_file(path)
    message = str(error.value)
    assert message.startswith(f"{path}:2: {reason}")
    for shape in ('{"prompt"/"question": "...", "response": "..."}', '"response": "..."}',
                  '{"messages": [..., {"role": "assistant", "content": "<response>"}]}'):
        assert shape in message


def test_accepted_shapes_use_the_chosen_fields(tmp_path):
    path = write(tmp_path / "t.jsonl", [{"q": "x"}])
    with pytest.raises(TraceFileError, match=re.escape('{"q": "...", "out": "..."}')):
        read_trace_file(path, prompt_field="q", response_field="out")
