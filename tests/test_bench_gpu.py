"""`bench/gpu.py --smoke`: the GPU benchmark's every stage on a CPU, under Triton's interpreter, on a tiny config."""

import json

from bench import gpu


def test_gpu_benchmark_smoke_runs_every_stage(tmp_path) -> None:
    result = gpu.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["smoke"] and saved["device"] == result["device"]
    assert [r["kv_cache_dtype"] for r in saved["kernel"]] == list(gpu.SMOKE.kv_cache_dtypes)
    assert all(r["gbps"] > 0 and r["kv_bytes"] > 0 for r in saved["kernel"])
    # Quantized KV reads fewer bytes than the model dtype's.
    assert saved["kernel"][1]["kv_bytes"] < saved["kernel"][0]["kv_bytes"]
    engine = saved["engine"]
    assert [r["share_ratio"] for r in engine] == [0.0, *gpu.SMOKE.share_ratios]
    assert all(r["tokens"] == gpu.SMOKE.num_requests * gpu.SMOKE.max_tokens for r in engine)
    assert engine[0]["memory_saved_mean"] == 0 and engine[1]["memory_saved_mean"] > 0
    assert saved["stage2"]["ms"] > 0
    assert (tmp_path / "gpu.png").stat().st_size > 0
