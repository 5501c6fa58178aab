"""What runs on vLLM's workers, where the KV cache lives: stage 2's partial sums, start-up checks, row reads.

`MemShareWorker` is a vLLM worker extension (`worker_extension_cls`, which the plugin sets when MemShare is on):
the engine core calls its methods by name through `collective_rpc`, on every tensor- and pipeline-parallel rank.
"""

from typing import Any

import torch

from memshare.layers.rotary import unrotate_neox
from memshare.sharing.stage2 import PartialSums, partial_sums
from memshare.vllm_plugin import _vllm_api as api


class MemShareWorker:
    """Methods vLLM adds to its worker class; `self` is the worker."""

    def memshare_check(self) -> list[str]:
        """Reasons this worker's KV cache cannot be read by stage 2 (empty: it can); reads the layout once."""
        problems = api.unreadable_kv(self)
        self._memshare_rope = api.rotary(self)
        if self._memshare_rope is not None and not self._memshare_rope.is_neox_style:
            problems.append("GPT-J-style (interleaved) rotary embeddings: stage 2 undoes NeoX-style RoPE only")
        if not problems:
            self._memshare_layers = api.layer_kv(self)
            self._memshare_counts_heads = api.counts_kv_heads(self)
        return problems

    def memshare_read_kv(self, block_ids: list[int],
                         first_positions: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of blocks, each [layers, blocks, block_size, kv_heads, head_dim] float32 on the worker's device:
        this rank's heads, each cache storage once; with `first_positions`, the keys' RoPE rotation undone."""
        index = torch.tensor(block_ids, dtype=torch.long)
        keys, values = (torch.stack(kv) for kv in zip(*(layer.read(index) for layer in self._memshare_layers)))
        if first_positions is not None:
            keys = unrotate_keys(self._memshare_rope, keys, first_positions)
        return keys, values

    def memshare_partial_sums(self, block_ids: list[int], first_positions: list[int], m: int,
                              metric: str) -> PartialSums | None:
        """Stage-2 sums of the first m blocks against the others over this rank's heads, moved to the host (a few
        numbers per layer); None on a rank whose KV heads another rank already counts."""
        if not self._memshare_counts_heads:
            return None
        keys, values = self.memshare_read_kv(block_ids, first_positions)
        names = [layer.name for layer in self._memshare_layers]
        sums = partial_sums(keys[:, :m], values[:, :m], keys[:, m:], values[:, m:], metric, names)
        return PartialSums(sums.layers, sums.cross.cpu(), sums.query_sq.cpu(), sums.key_sq.cpu())

    def memshare_describe(self) -> dict[str, Any]:
        """What this rank found: runner, attention backend, KV dtype, cell layout, layers read, heads counted."""
        layers = self._memshare_layers
        first = next(iter(api.attention_layers(self).values()))
        backend = first.attn_backend.get_name()
        return {"runner": type(self.model_runner).__module__, "backend": backend,
                "isa": getattr(first, "isa", None), "kv_cache_dtype": first.kv_cache_dtype,
                "cache": [str(layers[0].cache.dtype), *layers[0].cache.shape],
                "cell": "probed" if backend == api.CPU_BACKEND else "K|V",
                "layers_read": len(layers), "heads_counted": self._memshare_counts_heads}

    def memshare_block_rows(self) -> dict[str, list[Any]]:
        """Each request's block ids as this worker holds them: [request state's ids, input-batch row or None]."""
        return api.request_block_rows(self)


def unrotate_keys(rope: Any | None, keys: torch.Tensor, first_positions: list[int]) -> torch.Tensor:
    """keys [layers, blocks, block_size, heads, head_dim] with the RoPE rotation (of the model's rotary module `rope`,
    None: no RoPE) of their positions undone."""
    if rope is None:
        return keys
    bs = keys.shape[2]
    positions = (torch.tensor(first_positions).unsqueeze(1) + torch.arange(bs)).flatten()
    cache = rope.cos_sin_cache
    cos, sin = cache.index_select(0, positions.to(cache.device)).to(keys.device, torch.float32).chunk(2, -1)
    shape = (1, len(first_positions), bs, 1, -1)
    return unrotate_neox(keys, cos.view(shape), sin.view(shape))
