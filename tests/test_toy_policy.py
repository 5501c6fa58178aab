"""A policy added in one module (tests/toy_policy.py) is selectable everywhere: LLM, `memshare eval`, the CLI."""

import json

from memshare import LLM, SamplingParams
from memshare.entrypoints.cli import main

from . import toy_policy
from .conftest import MODEL


def test_toy_policy_runs_through_llm(prompts):
    llm = LLM(model=MODEL, num_kv_blocks=64, log_stats_interval=0, share=toy_policy.EveryNthConfig(every=1))
    llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
                 use_tqdm=False)
    stats = llm.stats()
    assert stats["share_policy"] == "every_nth" and stats["blocks_shared"] > 0 and stats["affected_ratio"] > 0
    assert stats["kv_blocks_used"] == 0


def test_toy_policy_runs_through_eval_report_and_cli(tmp_path, capsys):
    main(["eval", "--model", MODEL, "--dataset", "gsm8k", "--limit", "2", "--policies", "none,every_nth:every=1",
          "--temperature", "0", "--max-tokens", "64", "--kv-cache-memory", "64MiB", "--out", str(tmp_path)])
    summaries = {json.loads(p.read_text())["policy"]: json.loads(p.read_text())
                 for p in (tmp_path / "gsm8k").glob("*.summary.json")}
    assert summaries["every_nth"]["affected_ratio"] > 0 and summaries["none"]["affected_ratio"] == 0
    main(["report", str(tmp_path)])
    assert "| every_nth | every=1 |" in (tmp_path / "report.md").read_text()
    capsys.readouterr()
    main(["generate", "--model", MODEL, "--share", "every_nth", "--every", "1", "--max-tokens", "64", "--ignore-eos",
          "--json", "Count to twenty."])
    stats = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert stats["share_policy"] == "every_nth" and stats["blocks_shared"] > 0
