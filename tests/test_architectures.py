"""Tiny random Llama and Qwen2 models: greedy tokens equal transformers', on CPU and (when present) CUDA."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from memshare import LLM, SamplingParams

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def save_tiny_model(path, config) -> None:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    vocab = {f"w{i}": i for i in range(config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="w0", eos_token="w1",
                            unk_token="w2").save_pretrained(path)


@pytest.mark.parametrize("model_impl", ["auto", "transformers"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [LlamaConfig(**SHAPE), Qwen2Config(**SHAPE)], ids=["llama", "qwen2"])
def test_tiny_model_greedy_matches_hf(tmp_path, config, device, model_impl):
    save_tiny_model(tmp_path, config)
    prompts = [[5 + i, 17, 42 + i, 99, 7] * (i + 1) for i in range(6)]
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).to(device)
    reference.generation_config.eos_token_id = None
    expected = []
    with torch.inference_mode():
        for ids in prompts:
            out = reference.generate(torch.tensor([ids], device=device), max_new_tokens=40, do_sample=False,
                                     pad_token_id=0)
            expected.append(out[0, len(ids):].tolist())
    llm = LLM(model=str(tmp_path), device=device, dtype="float32", num_kv_blocks=24, block_size=8,
              model_impl=model_impl, log_stats_interval=0)
    # "auto" runs the lean Llama-family forward, "transformers" the HF modules.
    assert (llm.llm_engine.model_runner.paged_model is not None) == (model_impl == "auto")
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.stats()["num_preemptions"] > 0
