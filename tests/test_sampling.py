from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from memshare import SamplingParams
from memshare.engine.model_runner import sampling_batch
from memshare.engine.sequence import SequenceStatus
from memshare.layers.sampler import _candidates, _sample_rows

PROMPT = "Once upon a time, a little robot"


def sample(llm, params, prompts=(PROMPT,)):
    return llm.generate(list(prompts), params, use_tqdm=False)


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"), ({"min_p": 2.0}, "min_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"), ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"logprobs": -1}, "logprobs"), ({"stop": [""]}, "stop"), ({"stop_token_ids": [-2]}, "stop_token_ids"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} "):
        SamplingParams(**kwargs)


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
    expected = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False)
    assert out.prompt_token_ids == expected


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
