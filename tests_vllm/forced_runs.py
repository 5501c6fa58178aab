"""The self-check's forced, block-aligned repetitive trace run on a test's engine, recording every stage-2 score."""

from vllm import LLM

from memshare.vllm_plugin import memshare_stats
from memshare.vllm_plugin.check import close, generate_forced


def forced_run(llm: LLM, repeats: int = 4) -> dict:
    """Two requests forced through the trace on an in-process engine core with MemShare on; the engine is closed."""
    memshare = llm.llm_engine.engine_core.engine_core._memshare
    scores, score = {}, memshare.policy.score

    def recorded(block_ids, first_positions, m):
        scores[(tuple(block_ids), tuple(first_positions), m)] = result = score(block_ids, first_positions, m)
        return result

    memshare.policy.score = recorded
    outputs_forced = generate_forced(llm, repeats)
    run = {"ranks": llm.collective_rpc("memshare_describe"), "stats": memshare_stats(llm), "scores": scores,
           "outputs_forced": outputs_forced}
    close(llm)
    return run
