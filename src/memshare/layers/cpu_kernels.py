"""A fused paged-attention decode kernel for CPU, compiled on first use with torch's C++ extension loader.

Gathering each sequence's blocks into a dense tensor and then running small batched GEMMs reads the
context twice and spends most of its time in per-call overhead; this kernel walks the block table and
reads every key and value once, in parallel over (sequence, KV head).
"""

import logging
from functools import cache

import torch

logger = logging.getLogger("memshare")

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

// q [B, H, D]; caches [num_blocks, block_size, kv_heads, D]; block_tables [B, W]; context_lens [B].
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2), G = H / KVH, W = block_tables.size(1);
  q = q.contiguous();
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t block_stride = BS * KVH * D, token_stride = KVH * D;
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(G * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / KVH, h = item % KVH, L = lens[b];
      scores.resize(G * L);
      const float* qb = qp + (b * H + h * G) * D;
      for (int64_t t = 0; t < L; ++t) {
        const float* k = kp + tables[b * W + t / BS] * block_stride + (t % BS) * token_stride + h * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qb + g * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * k[d];
          scores[g * L + t] = dot * fscale;
        }
      }
      std::vector<float> inv_sum(G);
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * L;
        const float m = *std::max_element(s, s + L);
        float sum = 0.f;
        for (int64_t t = 0; t < L; ++t) { s[t] = std::exp(s[t] - m); sum += s[t]; }
        inv_sum[g] = 1.f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const float* v = vp + tables[b * W + t / BS] * block_stride + (t % BS) * token_stride + h * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * L + t];
          float* a = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * v[d];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* o = op + (b * H + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = acc[g * D + d] * inv_sum[g];
      }
    }
  });
  return out;
}
"""


@cache
def paged_decode_kernel():
    """The compiled kernel, or None where no compiler is available (the torch path is used then)."""
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline("memshare_cpu_kernels", cpp_sources=_SOURCE, functions=["paged_decode"],
                             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as error:  # a missing compiler or ninja must not stop inference
        logger.warning("CPU paged-attention kernel unavailable (%s); using the torch path", error)
        return None
    return module.paged_decode


def kernel_applies(k_cache: torch.Tensor) -> bool:
    return k_cache.device.type == "cpu" and k_cache.dtype == torch.float32 and k_cache.is_contiguous()
