"""The paper's ablations: stage-1 encoders (bag of words, mean input embedding, MiniLM) and the stage-2 metric."""

import pytest
import torch

from memshare import LLM, MemShareConfig, share_config
from memshare.sharing.stage1 import VectorStepIndex, make_encoder, sentence_embedding
from memshare.sharing.stage2 import block_similarity

from .conftest import MODEL
from .test_sharing import PASSAGE, REPEAT


def test_vector_index_scores_every_earlier_step_by_cosine():
    index = VectorStepIndex(MemShareConfig(step_threshold=0.9))
    for vector in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.1, 0.0], [-1.0, 0.0, 0.0]):
        index.add(torch.tensor(vector))
    hits = index.candidates(torch.tensor([2.0, 0.0, 0.0]))
    assert [i for i, _ in hits] == [0, 2] and hits[0][1] == pytest.approx(1.0)
    assert hits[1][1] == pytest.approx(1 / 1.01**0.5)


def test_embedding_encoder_is_the_mean_input_embedding():
    table = torch.arange(12.0).view(4, 3)
    encode, index = make_encoder(MemShareConfig(stage1="embedding"), lambda ids: "", lambda ids: table[ids])
    assert index is VectorStepIndex
    torch.testing.assert_close(encode([1, 3]), (table[1] + table[3]) / 2)


def test_minilm_encoder_ranks_a_paraphrase_above_an_unrelated_step():
    step = sentence_embedding("First add 12 and 30 to get 42 apples in total.")
    paraphrase = sentence_embedding("Adding 12 and 30 gives a total of 42 apples.")
    unrelated = sentence_embedding("The capital of France is Paris.")
    assert step.norm() == pytest.approx(1.0, abs=1e-5)
    assert step @ paraphrase > 0.7 > 0.3 > step @ unrelated


def test_cosine_metric_matches_float64_and_ignores_scale():
    gen = torch.Generator().manual_seed(0)
    qk, qv = torch.randn(2, 2, 3, 4, 2, 8, generator=gen).unbind(0)
    k, v = torch.randn(2, 2, 5, 4, 2, 8, generator=gen).unbind(0)
    k[:, 1], v[:, 1] = 3 * qk[:, 0], 3 * qv[:, 0]  # a scaled copy: cosine 1, normalized Euclidean well below
    got = block_similarity(qk, qv, k, v, metric="cosine")
    expected = torch.zeros(3, 5, dtype=torch.float64)
    for i in range(3):
        for j in range(5):
            for layer in range(2):
                for x, y in ((qk[layer, i], k[layer, j]), (qv[layer, i], v[layer, j])):
                    x, y = x.double().flatten(), y.double().flatten()
                    expected[i, j] += (x @ y / (x.norm() * y.norm())) / 4
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    assert got[0, 1] == pytest.approx(1.0, abs=1e-5)
    assert block_similarity(qk, qv, k, v)[0, 1] < 0.6


@pytest.mark.parametrize("stage1, stage2", [("embedding", "euclidean"), ("minilm", "euclidean"), ("bow", "cosine")])
def test_ablation_variants_share_a_repeated_passage(stage1, stage2):
    llm = LLM(model=MODEL, num_kv_blocks=96, log_stats_interval=0,
              share=share_config("memshare", stage1=stage1, stage2=stage2))
    llm.generate(PASSAGE * 2, REPEAT, use_tqdm=False)
    stats = llm.stats()
    assert stats["stage1_candidates"] > 0 and stats["blocks_shared"] > 0
    assert llm.llm_engine.block_manager.num_used_blocks == 0
