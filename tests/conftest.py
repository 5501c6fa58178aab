import os

# Triton kernels run on this CPU only under Triton's interpreter, read when triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memshare import LLM
from memshare.models.weights import resolve_model

MODEL = "smollm2-135m"
QUESTIONS = [
    "Solve 12*13.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a prime number is.",
    "List three primary colors.",
    "What is 2+2? Answer briefly.",
    "Name a mammal that can fly.",
    "Translate 'good morning' into Spanish.",
]


@pytest.fixture(scope="session")
def model_dir():
    return resolve_model(MODEL)[0]


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[list[int]]:
    """Chat-templated prompts: they share the system-prompt blocks, so prefix caching has hits."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for q in QUESTIONS]


@pytest.fixture(scope="session")
def hf_greedy(model_dir, prompts) -> list[list[int]]:
    """Hugging Face transformers' own greedy generate, one prompt at a time (no padding), 64 tokens past EOS."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    outputs = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, pad_token_id=0)
            outputs.append(out[0, len(ids):].tolist())
            assert len(outputs[-1]) == 64
    return outputs


@pytest.fixture(scope="session")
def llm() -> LLM:
    return LLM(model=MODEL, kv_cache_memory="256MiB", log_stats_interval=0)
