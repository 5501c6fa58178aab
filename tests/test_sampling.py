from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, RepetitionPenaltyLogitsProcessor

from memshare import SamplingParams
from memshare.engine.model_runner import penalties, sampling_batch
from memshare.engine.sequence import SequenceStatus
from memshare.errors import SamplingParamsError, SamplingParamsTypeError
from memshare.layers.sampler import Sampler, _candidates, _sample_rows, apply_penalties

PROMPT = "Once upon a time, a little robot"


def sample(llm, params, prompts=(PROMPT,)):
    return llm.generate(list(prompts), params, use_tqdm=False)


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"), ({"min_p": 2.0}, "min_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"), ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"logprobs": -1}, "logprobs"), ({"stop": [""]}, "stop"), ({"stop_token_ids": [-2]}, "stop_token_ids"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"seed": 1 << 64}, "seed"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(SamplingParamsError, match=rf"SamplingParams\.{field} "):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, expected", [
    ({"max_tokens": "64"}, "max_tokens must be an int or None, got str '64'"),
    ({"temperature": "0.7"}, "temperature must be a float, got str"), ({"n": 1.5}, "n must be an int, got float"),
    ({"top_k": True}, "top_k must be an int, got bool"), ({"stop": 5}, "stop must be a str, a list of str or None"),
    ({"ignore_eos": "yes"}, "ignore_eos must be a bool"), ({"seed": "1"}, "seed must be an int or None"),
    ({"stop_token_ids": 7}, "stop_token_ids must be a list of int or None"),
])
def test_wrong_types_name_the_field_and_type(kwargs, expected):
    with pytest.raises(SamplingParamsTypeError, match=rf"SamplingParams\.{expected}") as error:
        SamplingParams(**kwargs)
    assert isinstance(error.value, TypeError) and isinstance(error.value, ValueError)


def test_seed_reproducible_whatever_runs_beside_it(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24)
    alone = sample(llm, params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=24)
    crowd = llm.generate(["Hello there", PROMPT, "Count to ten"], [others, params, others], use_tqdm=False)
    assert crowd[1].outputs[0].token_ids == alone
    other_seed = sample(llm, SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=24))
    assert other_seed[0].outputs[0].token_ids != alone


def test_top_k_one_and_min_p_one_equal_greedy(llm):
    greedy = sample(llm, SamplingParams(temperature=0, max_tokens=16))[0].outputs[0].token_ids
    assert sample(llm, SamplingParams(temperature=1.0, top_k=1, max_tokens=16))[0].outputs[0].token_ids == greedy
    assert sample(llm, SamplingParams(temperature=1.0, min_p=1.0, max_tokens=16))[0].outputs[0].token_ids == greedy
    assert sample(llm, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=16))[0].outputs[0].token_ids == greedy
    # Values that round to 0 in float32 (found by the server's fuzz test) sample greedily instead of failing.
    assert sample(llm, SamplingParams(temperature=1.0, top_p=5e-324, max_tokens=16))[0].outputs[0].token_ids == greedy
    assert sample(llm, SamplingParams(temperature=5e-324, max_tokens=16))[0].outputs[0].token_ids == greedy


def test_stop_string_truncates_text(llm):
    full = sample(llm, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    stop = full.text[20:26]
    out = sample(llm, SamplingParams(temperature=0, max_tokens=40, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.find(stop)]
    kept = sample(llm, SamplingParams(temperature=0, max_tokens=40, stop=stop, include_stop_str_in_output=True))
    assert kept[0].outputs[0].text == full.text[: full.text.find(stop) + len(stop)]


def test_stop_token_ids_max_tokens_min_tokens_ignore_eos(llm):
    full = sample(llm, SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    stop_id = full.token_ids[5]
    out = sample(llm, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    short = sample(llm, SamplingParams(temperature=0, max_tokens=64), ["Solve 12*13."])[0].outputs[0]
    assert short.finish_reason == "stop" and len(short.token_ids) < 40
    eos = llm.llm_engine.model_runner.eos_token_ids
    longer = sample(llm, SamplingParams(temperature=0, max_tokens=64, min_tokens=40), ["Solve 12*13."])
    assert len(longer[0].outputs[0].token_ids) >= 40
    assert not set(longer[0].outputs[0].token_ids[:40]) & eos
    ignored = sample(llm, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), ["Solve 12*13."])
    assert len(ignored[0].outputs[0].token_ids) == 48
    assert ignored[0].outputs[0].token_ids[: len(short.token_ids)] == short.token_ids


def test_logprobs_match_hf(llm, model_dir):
    out = sample(llm, SamplingParams(temperature=0, max_tokens=3, logprobs=5))[0].outputs[0]
    assert len(out.logprobs) == 3 and all(len(lp) == 5 for lp in out.logprobs)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + out.token_ids])).logits[0, len(prompt_ids) - 1 :]
    expected = logits.log_softmax(-1)
    for position, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert entry[token].rank == 1
        assert entry[token].logprob == pytest.approx(float(expected[position, token]), abs=1e-3)
        top = expected[position].topk(5).indices.tolist()
        assert sorted(entry) == sorted(top)
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_parallel_samples_share_prompt_blocks(llm):
    engine = llm.llm_engine
    long_prompt = "Tell me everything about the history of mathematics, from Babylon to today. " * 3
    engine.add_request("fork", long_prompt, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8))
    seqs = engine.sequences("fork")
    engine.step()
    assert all(s.status is SequenceStatus.RUNNING for s in seqs)
    full = (seqs[0].num_prompt_tokens - 1) // engine.block_manager.block_size
    assert full >= 2
    for index in range(full):
        shared = {s.block_table[index] for s in seqs}
        assert len(shared) == 1
        assert engine.block_manager.blocks[shared.pop()].ref_cnt == 4
    while engine.has_unfinished_requests():
        outputs = engine.step()
    assert len({tuple(o.token_ids) for o in outputs[0].outputs}) > 1
    assert [o.index for o in outputs[0].outputs] == [0, 1, 2, 3]


def test_chat_applies_template(llm):
    messages = [{"role": "user", "content": "Solve 12*13."}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert out.prompt_token_ids == expected
    prefill = [*messages, {"role": "assistant", "content": "12*13 is"}]
    out = llm.chat(prefill, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False, add_generation_prompt=False,
                   continue_final_message=True)[0]
    assert tokenizer.decode(out.prompt_token_ids).endswith("<|im_start|>assistant\n12*13 is")
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(prefill, continue_final_message=True)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}=>{% endif %}{{ x }}"
    out = llm.chat(messages, SamplingParams(max_tokens=1), use_tqdm=False, chat_template=template,
                   chat_template_kwargs={"x": "!"})[0]
    assert tokenizer.decode(out.prompt_token_ids) == "Solve 12*13.=>!"


def penalized_rows(vocab: int) -> list[SimpleNamespace]:
    gen = torch.Generator().manual_seed(1)
    settings = [(1.0, 0.0, 0.0), (1.8, 0.0, 0.0), (0.6, 0.0, 0.0), (1.0, 0.7, 0.0), (1.0, 0.0, -1.2), (1.3, -0.5, 0.9)]
    rows = []
    for repetition, presence, frequency in settings:
        prompt = torch.randint(vocab, (12,), generator=gen).tolist()
        output = torch.randint(vocab // 4, (20,), generator=gen).tolist()  # repeats, some of them in the prompt
        params = SamplingParams(repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency)
        rows.append(SimpleNamespace(params=params, token_ids=prompt + output, num_prompt_tokens=len(prompt),
                                    output_token_ids=output, num_output_tokens=len(output), generator=None))
    return rows


def reference_penalties(logits: torch.Tensor, row: SimpleNamespace) -> torch.Tensor:
    """vLLM's penalties on one row, token by token."""
    logits, p = logits.clone(), row.params
    for token in set(row.token_ids):
        value = logits[token]
        logits[token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
    for token in set(row.output_token_ids):
        logits[token] -= p.frequency_penalty * row.output_token_ids.count(token) + p.presence_penalty
    return logits


def test_penalties_equal_a_reference_per_row():
    vocab = 300
    rows = penalized_rows(vocab)
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(2)) * 3
    penalized = apply_penalties(logits.clone(), penalties(rows, logits.device))
    for row, seq in enumerate(rows):
        torch.testing.assert_close(penalized[row], reference_penalties(logits[row], seq))
        if seq.params.presence_penalty == seq.params.frequency_penalty == 0:
            hf = RepetitionPenaltyLogitsProcessor(seq.params.repetition_penalty)
            torch.testing.assert_close(penalized[row], hf(torch.tensor([seq.token_ids]), logits[row : row + 1])[0])
    assert torch.equal(penalized[0], logits[0])
    defaults = [SimpleNamespace(params=SamplingParams(), generator=None, num_output_tokens=0)] * 3
    assert penalties(defaults, logits.device) is None and sampling_batch(defaults, [], logits.device).penalties is None
    for seq in rows:
        seq.params.temperature = 0
    tokens, _ = Sampler(str)(logits.clone(), sampling_batch(rows, [], logits.device))
    assert tokens == [int(reference_penalties(logits[i], seq).argmax()) for i, seq in enumerate(rows)]


def test_penalties_steer_greedy_output(llm):
    prompt = "Repeat the word apple ten times:"
    greedy = {"temperature": 0, "max_tokens": 24}
    plain, repetition, presence, mixed = llm.generate([prompt] * 4, [
        SamplingParams(**greedy), SamplingParams(**greedy, repetition_penalty=50),
        SamplingParams(**greedy, presence_penalty=2, frequency_penalty=2), SamplingParams(**greedy)], use_tqdm=False)
    prompt_ids = set(llm.get_tokenizer().encode(prompt))

    def repeats(out) -> int:
        ids = out.outputs[0].token_ids
        return len(ids) - len(set(ids))

    assert repeats(plain) >= 10  # "Apple (10)\nApple (11)\n..."
    ids = repetition.outputs[0].token_ids
    assert repeats(repetition) == 0 and not set(ids) & prompt_ids
    assert repeats(presence) < repeats(plain) // 2
    assert mixed.outputs[0].token_ids == plain.outputs[0].token_ids  # each row its own penalties


def reference_kept(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Full-vocabulary sort: the tokens temperature, top-k, top-p and min-p keep, in vLLM's order."""
    probs = (logits / temperature).softmax(0)
    order = probs.argsort(descending=True)
    kept = order[:top_k] if top_k else order
    p = probs[kept] / probs[kept].sum()
    kept = kept[(p.cumsum(0) - p) < top_p]
    return {int(t) for t in kept if probs[t] >= probs.max() * min_p}


def test_candidate_filters_equal_a_full_sort():
    gen = torch.Generator().manual_seed(0)
    settings = [(0.6, 0, 0.95, 0.0), (1.0, 50, 0.9, 0.0), (0.8, 0, 1.0, 0.05), (1.3, 0, 0.99, 0.0),
                (0.7, 5, 1.0, 0.0), (1.0, 0, 0.5, 0.2)]
    logits = torch.randn(len(settings), 5000, generator=gen) * torch.tensor([1.0, 3.0, 2.0, 0.5, 4.0, 1.0])[:, None]
    seqs = [SimpleNamespace(params=SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m), generator=None,
                            num_output_tokens=0) for t, k, p, m in settings]
    probs, ids = _candidates(logits, sampling_batch(seqs, [], logits.device))
    for row, (t, k, p, m) in enumerate(settings):
        row_probs, row_ids = (probs[row], ids[row]) if ids is not None else (probs[row], range(5000))
        got = {int(i) for i, q in zip(row_ids, row_probs) if q > 0}
        assert got == reference_kept(logits[row], t, k, p, m)
    min_p_only = [SimpleNamespace(params=SamplingParams(temperature=0.8, min_p=0.05), generator=None,
                                  num_output_tokens=0)]
    probs, ids = _candidates(logits[2:3], sampling_batch(min_p_only, [], logits.device))
    assert ids is None and {int(i) for i in probs[0].nonzero()} == reference_kept(logits[2], 0.8, 0, 1.0, 0.05)


def test_sampling_follows_the_kept_probabilities():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20000, 1)
    counts = torch.bincount(_sample_rows(probs, [None] * 20000), minlength=5) / 20000
    assert counts[1] == counts[4] == 0
    torch.testing.assert_close(counts, probs[0], atol=0.015, rtol=0)
