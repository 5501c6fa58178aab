"""The self-check's forced, block-aligned repetitive trace run on a test's engine, recording every stage-2 score."""

import gc

from vllm import LLM, SamplingParams

from memshare.vllm_plugin import memshare_stats
from memshare.vllm_plugin.check import forced_trace


def close(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def forced_run(llm: LLM, repeats: int = 4) -> dict:
    """Two requests forced through the trace on an in-process engine core with MemShare on; the engine is closed."""
    memshare = llm.llm_engine.engine_core.engine_core._memshare
    scores, score = {}, memshare.policy.score

    def recorded(block_ids, first_positions, m):
        scores[(tuple(block_ids), tuple(first_positions), m)] = result = score(block_ids, first_positions, m)
        return result

    memshare.policy.score = recorded
    prompt, forced = forced_trace(llm, repeats)
    params = SamplingParams(temperature=0, max_tokens=len(forced), ignore_eos=True,
                            extra_args={"forced_token_ids": forced})
    outputs = llm.generate([{"prompt_token_ids": prompt}] * 2, params, use_tqdm=False)
    run = {"ranks": llm.collective_rpc("memshare_describe"), "stats": memshare_stats(llm), "scores": scores,
           "outputs_forced": all(list(o.outputs[0].token_ids) == forced for o in outputs)}
    close(llm)
    return run
