"""A lean forward for Llama-family decoders (Llama, Mistral, Qwen2) over the flat paged batch.

transformers' modules spend time in per-module Python (kwargs plumbing, mask and cache bookkeeping) and ~30 ops
per layer, which torch.compile did not remove on this CPU (docs/BENCHMARKS.md). This forward runs the same weights
with Q/K/V and gate/up fused into one GEMM each, the residual add fused into RMSNorm, and 8 ops per layer
(layers/fused.py): a batch-32 decode step of smollm2-135m takes 84 ms instead of 101. Other architectures keep
the transformers modules.
"""

from functools import cached_property

import torch
from torch import nn
from transformers import PreTrainedModel

from memshare.layers.attention import PagedContext, paged_attention
from memshare.layers.cpu_kernels import cpu_ops, kernel_applies
from memshare.layers.fused import fused_add_rms_norm, rms_norm, rotary_embedding, silu_and_mul
from memshare.layers.linear import PanelLinear, fuse_linears


class PagedDecoderLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.layer_idx, self.scale, self.head_dim = attn.layer_idx, attn.scaling, attn.head_dim
        self.q_size, self.kv_size = attn.q_proj.out_features, attn.k_proj.out_features
        self.qkv_proj = fuse_linears(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o_proj = attn.o_proj
        self.gate_up_proj = fuse_linears(mlp.gate_proj, mlp.up_proj)
        self.down_proj = mlp.down_proj
        self.input_norm, self.post_attention_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.eps = layer.input_layernorm.variance_epsilon

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                paged: PagedContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream before it), as vLLM passes them to fuse the add into the norm."""
        tokens = hidden.shape[0]
        if residual is None:
            hidden, residual = rms_norm(hidden, self.input_norm.weight, self.eps), hidden
        else:
            hidden, residual = fused_add_rms_norm(hidden, residual, self.input_norm.weight, self.eps)
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = rotary_embedding(q.view(tokens, -1, self.head_dim), k.view(tokens, -1, self.head_dim), cos, sin)
        attn = paged_attention(q, k, v.view(tokens, -1, self.head_dim), self.layer_idx, paged, self.scale)
        hidden, residual = fused_add_rms_norm(self.o_proj(attn.view(tokens, self.q_size)), residual,
                                              self.post_attention_norm.weight, self.eps)
        return self.down_proj(silu_and_mul(self.gate_up_proj(hidden))), residual

    def stack_args(self) -> tuple[list[torch.Tensor], list[int]] | None:
        """This layer's weights and shapes as cpu_kernels' decode_layers reads them; None unless all are panels."""
        linears = (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj)
        if not all(isinstance(linear, PanelLinear) for linear in linears):
            return None
        weights = [self.input_norm.weight, self.post_attention_norm.weight]
        shapes = []
        for linear in linears:
            data, d, m, bias, bits, n, group = linear.kernel_args
            weights += [data, d, m, bias]
            shapes += [bits, n, group]
        return weights, shapes


class PagedLlamaForCausalLM(nn.Module):
    """The decoder of a loaded HF Llama-family model, run on the flat batch; takes over its decoder layers."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        base = model.model
        self.embed_tokens, self.rotary_emb, self.norm, self.lm_head = \
            base.embed_tokens, base.rotary_emb, base.norm, model.lm_head
        self.layers = nn.ModuleList(PagedDecoderLayer(layer) for layer in base.layers)
        # The fused copies replace the HF projections; dropping the HF layers keeps one copy of each weight.
        base.layers = nn.ModuleList()

    @staticmethod
    def applies(model: PreTrainedModel) -> bool:
        """Whether a model of a Llama-family type (models/registry.py: LEAN_MODELS) has what this forward runs."""
        return model.config.hidden_act == "silu" and hasattr(model.model, "rotary_emb")

    @cached_property
    def _stack(self) -> tuple[list[torch.Tensor], list[int]] | None:
        """Every layer's decode_layers weights and shapes, built on the first decode step; None unless every
        projection is a panel layer."""
        parts = [layer.stack_args() for layer in self.layers]
        if any(part is None for part in parts):
            return None
        return [w for weights, _ in parts for w in weights], [s for _, shapes in parts for s in shapes]

    def _runs_stack(self, hidden: torch.Tensor, paged: PagedContext) -> bool:
        """Whether this step runs as one decode_layers call: single-token decodes only, on the CPU backend, float32
        KV, panel weights, no policy reading the queries, and no profiler running (bench/decode_profile.py)."""
        if paged.metadata.prefills or paged.backend != "cpu" or paged.decode_queries is not None:
            return False
        if torch.autograd.profiler._is_profiler_enabled:  # the per-layer path names each kernel for the profiler
            return False
        return kernel_applies(hidden) and paged.kv_cache.float32_planes is not None and self._stack is not None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, logits_rows: torch.Tensor,
                paged: PagedContext) -> torch.Tensor:
        """input_ids, positions [T] -> logits [len(logits_rows), vocab]."""
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(hidden, positions.unsqueeze(0))
        if self._runs_stack(hidden, paged):
            weights, shapes = self._stack
            first, meta = self.layers[0], paged.metadata
            hidden, residual = cpu_ops().decode_layers(
                hidden, cos[0], sin[0], meta.slot_mapping, meta.decode_block_tables, meta.decode_context_lens,
                weights, shapes, paged.kv_cache.float32_planes, first.q_size // first.head_dim,
                first.kv_size // first.head_dim, first.head_dim, first.eps, first.scale)
        else:
            residual = None
            for layer in self.layers:
                hidden, residual = layer(hidden, residual, cos[0], sin[0], paged)
        hidden, _ = fused_add_rms_norm(hidden.index_select(0, logits_rows), residual.index_select(0, logits_rows),
                                       self.norm.weight, self.norm.variance_epsilon)
        return self.lm_head(hidden)
