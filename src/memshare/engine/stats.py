"""The memory figures the engine reports, formed from raw counters in one place: `LLMEngine.get_stats`, the eval
harness (over the sessions of a resumed run) and the vLLM plugin all call these."""

from collections.abc import Mapping, Sequence

DENSE_FORMATS = ("float32", "bfloat16")
# The counters a session keeps for `memory_saved`.
MEMORY_KEYS = ("peak_used_blocks", "peak_logical_blocks", "sum_used_blocks", "sum_logical_blocks")
# The counters a session keeps for `kv_bytes_saved`.
BYTES_KEYS = ("kv_block_bytes", "kv_tail_block_bytes", "sum_tail_blocks",
              *(f"kv_block_bytes_{name}" for name in DENSE_FORMATS))


def saved_fraction(used: float, logical: float) -> float:
    """1 - physical / logical: the share of the KV that sharing or eviction freed (0 when nothing was logical)."""
    return 1 - used / logical if logical else 0.0


def memory_saved(sessions: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Blocks saved at the peak and on average over the steps, from each session's used and logical block counts."""
    peak_used = max((s["peak_used_blocks"] for s in sessions), default=0)
    peak_logical = max((s["peak_logical_blocks"] for s in sessions), default=0)
    return {"memory_saved_peak": saved_fraction(peak_used, peak_logical),
            "memory_saved_mean": saved_fraction(sum(s["sum_used_blocks"] for s in sessions),
                                                sum(s["sum_logical_blocks"] for s in sessions))}


def kv_bytes_saved(sessions: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """KV bytes in use over the steps (blocks in the run's format plus tail blocks being filled) against the dense
    KV of the same tokens in float32 and in bfloat16; nothing for sessions saved before KV dtypes existed."""
    if not all(key in s for s in sessions for key in BYTES_KEYS):
        return {}
    used = sum(s["sum_used_blocks"] * s["kv_block_bytes"] + s["sum_tail_blocks"] * s["kv_tail_block_bytes"]
               for s in sessions)
    return {f"kv_bytes_saved_vs_{name}":
            saved_fraction(used, sum(s["sum_logical_blocks"] * s[f"kv_block_bytes_{name}"] for s in sessions))
            for name in DENSE_FORMATS}
