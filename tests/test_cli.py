"""The command line takes vLLM's spellings where the meaning is the same."""

from memshare.entrypoints.cli import build_parser, engine_kwargs


def test_serve_accepts_vllm_spellings():
    args = build_parser().parse_args([
        "serve", "--num-gpu-blocks-override", "40", "--no-enable-prefix-caching", "--max-num-seqs", "8",
        "--max-model-len", "512", "--served-model-name", "qwq", "--api-key", "k", "--kv-cache-memory-bytes", "1000"])
    engine = engine_kwargs(args)
    assert (engine["num_kv_blocks"], engine["enable_prefix_caching"], engine["max_num_seqs"]) == (40, False, 8)
    assert (engine["max_model_len"], engine["kv_cache_memory"]) == (512, "1000")
    assert (args.served_model_name, args.api_key) == ("qwq", "k")


def test_prefix_caching_defaults_on_and_has_both_switches():
    parse = build_parser().parse_args
    assert engine_kwargs(parse(["generate", "x"]))["enable_prefix_caching"] is True
    assert engine_kwargs(parse(["generate", "x", "--enable-prefix-caching"]))["enable_prefix_caching"] is True
    assert engine_kwargs(parse(["generate", "x", "--num-kv-blocks", "9"]))["num_kv_blocks"] == 9


def test_kv_cache_dtype_flag_takes_vllm_names_and_a_list_for_the_tools(tmp_path, capsys):
    import pytest

    from memshare.entrypoints.cli import main

    assert engine_kwargs(build_parser().parse_args(["generate", "x", "--kv-cache-dtype", "fp8"]))["kv_cache_dtype"] \
        == "fp8"
    with pytest.raises(SystemExit) as exit_info:  # an unknown dtype in a tool's list stops before any model loads
        main(["replay", "--traces", str(tmp_path / "none.jsonl"), "--kv-cache-dtype", "auto,fp4", "--out",
              str(tmp_path)])
    assert exit_info.value.code == 2
    assert "fp4" in capsys.readouterr().err and not (tmp_path / "none").exists()
