"""Fused CPU kernels, compiled on first use with torch's C++ extension loader: paged-attention decode and the
decoder layer's small ops (RMSNorm with the residual add, rotary embedding, SiLU-and-mul; vLLM's names).

Gathering each sequence's blocks into a dense tensor and then running small batched GEMMs reads the
context twice and spends most of its time in per-call overhead; this kernel walks the block table and
reads every key and value once, in parallel over sequences. Each sequence sweeps every KV head's keys of a
token together, as they lie in the cache: 1.9 -> 1.4 ms per layer of smollm2-135m at batch 32, context 245.
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
#include <cstdint>
#include <vector>

// The vectorized expf (libmvec) drops to a scalar path for a whole vector when one lane is beyond +-87, which
// made SiLU 2x slower on real activations; clamping there changes results by under 1e-37.
static inline float fast_exp(float x) { return std::exp(std::min(std::max(x, -80.f), 80.f)); }

// One plane (K or V) of a layer's cache as the kernel reads it: codes [num_blocks, BS, KVH, D values], a value
// being code * scale + zero (fp8: lut[code] * scale, lut[byte] the byte's fp8 value; int4: two codes a byte).
// Scale mode 0: none; 1: one per token and head ([NB, BS, KVH]); 2: one per channel, head and block
// ([NB, KVH, D]). A block with a tail index >= 0 is still being filled and is read from the tail pool instead:
// int8 codes [tails, BS, KVH, D] with one scale per token and head.
struct Plane {
  const void* codes;
  const at::Half* scale;
  const at::Half* zero;
  int64_t mode;
  const int8_t* tail_codes;
  const at::Half* tail_scale;
};

struct Layout {
  int64_t BS, KVH, D;
  const float* lut;
  float int4_offset;  // 8: symmetric codes around zero; 0: asymmetric with a zero point
  const int64_t* tail_of_block;
};

// Per-channel scales and zero points (mode 2) of the block last read for each head, in float: a block's 16 tokens
// share them, so they are converted from float16 once per block instead of once per token.
struct ChannelScales {
  std::vector<float> values;  // per head: D scales, then D zero points
  std::vector<int64_t> block;  // per head slot: block * KVH + head of the values held
  ChannelScales(int64_t heads, int64_t D) : values(heads * 2 * D), block(heads, -1) {}
  const float* scale(const struct Plane& p, const Layout& l, int64_t blk, int64_t h);
};

// How codes are stored: each decode loop below vectorizes; only fp8 goes through its 256-entry table.
enum Code { F32, BF16, INT8, FP8, INT4 };

// A pointer to the float row of one token and head: the cache itself for float32, else `buf`, dequantized.
const float* ChannelScales::scale(const Plane& p, const Layout& l, int64_t blk, int64_t h) {
  const int64_t D = l.D, slot = h % static_cast<int64_t>(block.size()), key = blk * l.KVH + h;
  float* out = values.data() + slot * 2 * D;
  if (block[slot] != key) {
    const at::Half *s = p.scale + key * D, *z = p.zero + key * D;
    for (int64_t i = 0; i < D; ++i) { out[i] = static_cast<float>(s[i]); out[D + i] = static_cast<float>(z[i]); }
    block[slot] = key;
  }
  return out;
}

template <int CODE>
static inline const float* load_row(const Plane& p, const Layout& l, int64_t blk, int64_t off, int64_t h,
                                    float* __restrict__ buf, ChannelScales& channel) {
  const int64_t D = l.D, row = (blk * l.BS + off) * l.KVH + h;
  if (l.tail_of_block != nullptr && l.tail_of_block[blk] >= 0) {
    const int64_t tail_row = (l.tail_of_block[blk] * l.BS + off) * l.KVH + h;
    const int8_t* c = p.tail_codes + tail_row * D;
    const float s = static_cast<float>(p.tail_scale[tail_row]);
    for (int64_t i = 0; i < D; ++i) buf[i] = static_cast<float>(c[i]) * s;
    return buf;
  }
  if constexpr (CODE == F32) {
    return static_cast<const float*>(p.codes) + row * D;
  } else if constexpr (CODE == BF16) {
    const at::BFloat16* c = static_cast<const at::BFloat16*>(p.codes) + row * D;
    for (int64_t i = 0; i < D; ++i) buf[i] = static_cast<float>(c[i]);
    return buf;
  } else {
    if constexpr (CODE == INT8) {
      const int8_t* c = static_cast<const int8_t*>(p.codes) + row * D;
      for (int64_t i = 0; i < D; ++i) buf[i] = static_cast<float>(c[i]);
    } else if constexpr (CODE == FP8) {
      const uint8_t* c = static_cast<const uint8_t*>(p.codes) + row * D;
      for (int64_t i = 0; i < D; ++i) buf[i] = l.lut[c[i]];
    } else {
      const uint8_t* c = static_cast<const uint8_t*>(p.codes) + row * (D / 2);
      for (int64_t i = 0; i < D / 2; ++i) {
        buf[2 * i] = static_cast<float>(c[i] & 15) - l.int4_offset;
        buf[2 * i + 1] = static_cast<float>(c[i] >> 4) - l.int4_offset;
      }
    }
    if (p.mode == 1) {
      const float s = static_cast<float>(p.scale[row]), z = p.zero ? static_cast<float>(p.zero[row]) : 0.f;
      for (int64_t i = 0; i < D; ++i) buf[i] = buf[i] * s + z;
    } else if (p.mode == 2) {
      const float *s = channel.scale(p, l, blk, h), *z = s + D;
      for (int64_t i = 0; i < D; ++i) buf[i] = buf[i] * s[i] + z[i];
    }
    return buf;
  }
}

// q [B, H, D]; block_tables [B, W]; context_lens [B]. One work item is a sequence with all its KV heads, so that
// each token's keys (and values) of every head, contiguous in the cache, are read in one sequential sweep; with
// fewer sequences than threads an item is one KV head of one sequence. Quantized rows are dequantized into a
// D-float buffer per row, never into a copy of the cache.
template <int CODE>
static void decode_impl(const float* qp, float* op, const Plane& K, const Plane& V, const Layout& l,
                        const int64_t* tables, const int64_t* lens, int64_t B, int64_t H, int64_t W, float fscale) {
  const int64_t D = l.D, BS = l.BS, G = H / l.KVH;
  const int64_t heads_per_item = B >= 2 * at::get_num_threads() ? l.KVH : 1;
  const int64_t items_per_seq = l.KVH / heads_per_item;
  at::parallel_for(0, B * items_per_seq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score_buf, acc_buf(heads_per_item * G * D), q_buf(heads_per_item * G * D), row_buf(D);
    ChannelScales k_channels(heads_per_item, D), v_channels(heads_per_item, D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / items_per_seq, h0 = (item % items_per_seq) * heads_per_item, L = lens[b];
      const int64_t R = heads_per_item * G;  // query rows of this item
      score_buf.resize(R * L);
      float* __restrict__ scores = score_buf.data();
      float* __restrict__ acc = acc_buf.data();
      float* __restrict__ qs = q_buf.data();
      const float* qb = qp + (b * H + h0 * G) * D;
      for (int64_t i = 0; i < R * D; ++i) qs[i] = qb[i] * fscale;
      const int64_t* table = tables + b * W;
      for (int64_t t = 0; t < L; ++t) {
        for (int64_t hh = 0; hh < heads_per_item; ++hh) {
          const float* __restrict__ kh = load_row<CODE>(K, l, table[t / BS], t % BS, h0 + hh, row_buf.data(),
                                                             k_channels);
          for (int64_t g = 0; g < G; ++g) {
            const float* __restrict__ qr = qs + (hh * G + g) * D;
            float dot = 0.f;
            for (int64_t d = 0; d < D; ++d) dot += qr[d] * kh[d];
            scores[(hh * G + g) * L + t] = dot;
          }
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        float* s = scores + r * L;
        float m = s[0];
        for (int64_t t = 1; t < L; ++t) m = std::max(m, s[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < L; ++t) { s[t] = fast_exp(s[t] - m); sum += s[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < L; ++t) s[t] *= inv;
      }
      std::fill(acc, acc + R * D, 0.f);
      for (int64_t t = 0; t < L; ++t) {
        for (int64_t hh = 0; hh < heads_per_item; ++hh) {
          const float* __restrict__ vh = load_row<CODE>(V, l, table[t / BS], t % BS, h0 + hh, row_buf.data(),
                                                             v_channels);
          for (int64_t g = 0; g < G; ++g) {
            const float p = scores[(hh * G + g) * L + t];
            float* __restrict__ a = acc + (hh * G + g) * D;
            for (int64_t d = 0; d < D; ++d) a[d] += p * vh[d];
          }
        }
      }
      std::copy(acc, acc + R * D, op + (b * H + h0 * G) * D);
    }
  });
}

static Plane plane(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& zero, int64_t mode,
                   const torch::Tensor& tail_codes, const torch::Tensor& tail_scale) {
  return {codes.data_ptr(), scale.numel() ? scale.data_ptr<at::Half>() : nullptr,
          zero.numel() ? zero.data_ptr<at::Half>() : nullptr, mode,
          tail_codes.numel() ? reinterpret_cast<const int8_t*>(tail_codes.data_ptr<uint8_t>()) : nullptr,
          tail_scale.numel() ? tail_scale.data_ptr<at::Half>() : nullptr};
}

// The arguments after q are KVCache.kernel_args(layer) followed by the block tables, lengths and scale.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_codes, torch::Tensor k_scale, torch::Tensor k_zero,
                           int64_t k_mode, torch::Tensor v_codes, torch::Tensor v_scale, torch::Tensor v_zero,
                           int64_t v_mode, torch::Tensor lut, int64_t code, torch::Tensor k_tail_codes,
                           torch::Tensor k_tail_scale, torch::Tensor v_tail_codes, torch::Tensor v_tail_scale,
                           torch::Tensor tail_of_block, torch::Tensor block_tables,
                           torch::Tensor context_lens, double scale) {
  q = q.contiguous();
  auto out = torch::empty_like(q);
  const Layout l{k_codes.size(1), k_codes.size(2), q.size(2), lut.data_ptr<float>(), -lut.data_ptr<float>()[0],
                 tail_of_block.numel() ? tail_of_block.data_ptr<int64_t>() : nullptr};
  const Plane K = plane(k_codes, k_scale, k_zero, k_mode, k_tail_codes, k_tail_scale);
  const Plane V = plane(v_codes, v_scale, v_zero, v_mode, v_tail_codes, v_tail_scale);
  auto run = [&](auto impl) {
    impl(q.data_ptr<float>(), out.data_ptr<float>(), K, V, l, block_tables.data_ptr<int64_t>(),
         context_lens.data_ptr<int64_t>(), q.size(0), q.size(1), block_tables.size(1), static_cast<float>(scale));
  };
  switch (code) {
    case F32: run(decode_impl<F32>); break;
    case BF16: run(decode_impl<BF16>); break;
    case INT8: run(decode_impl<INT8>); break;
    case FP8: run(decode_impl<FP8>); break;
    case INT4: run(decode_impl<INT4>); break;
    default: TORCH_CHECK(false, "paged_decode: unknown code kind ", code);
  }
  return out;
}

// Each small op below replaces 3-7 torch ops of a decoder layer, one dispatch and one pass over memory each.
static void rms_norm_row(const float* x, const float* w, float* out, int64_t H, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < H; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / H + eps);
  for (int64_t i = 0; i < H; ++i) out[i] = w[i] * (x[i] * inv);
}

// x [T, H] -> RMSNorm(x) * w
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  x = x.contiguous();
  auto out = torch::empty_like(x);
  const int64_t H = x.size(-1);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.numel() / H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) rms_norm_row(xp + t * H, wp, op + t * H, H, eps);
  });
  return out;
}

// In place: residual += x, then x = RMSNorm(residual) * w.
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor w, double eps) {
  const int64_t H = x.size(-1);
  float *xp = x.data_ptr<float>(), *rp = residual.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  at::parallel_for(0, x.numel() / H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float *xr = xp + t * H, *rr = rp + t * H;
      for (int64_t i = 0; i < H; ++i) rr[i] += xr[i];
      rms_norm_row(rr, wp, xr, H, eps);
    }
  });
}

// In place on q [T, Hq, D] and k [T, Hk, D] (rows may be strided, D contiguous), HF's rotate-half convention:
// x * cos + cat(-x2, x1) * sin with cos, sin [T, D].
void rotary_embedding(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  const int64_t T = q.size(0), D = q.size(2), half = D / 2;
  cos = cos.contiguous();
  sin = sin.contiguous();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float *c = cp + t * D, *s = sp + t * D;
      for (torch::Tensor* x : {&q, &k}) {
        for (int64_t h = 0; h < x->size(1); ++h) {
          float* __restrict__ v = x->data_ptr<float>() + t * x->stride(0) + h * x->stride(1);
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = v[i], x2 = v[half + i];
            v[i] = x1 * c[i] - x2 * s[i];
            v[half + i] = x2 * c[half + i] + x1 * s[half + i];
          }
        }
      }
    }
  });
}

// x [T, 2I] -> silu(x[:, :I]) * x[:, I:]
torch::Tensor silu_and_mul(torch::Tensor x) {
  x = x.contiguous();
  const int64_t I = x.size(-1) / 2, T = x.numel() / (2 * I);
  auto out = torch::empty({T, I}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float *gate = xp + t * 2 * I, *up = gate + I;
      float* o = op + t * I;
      for (int64_t i = 0; i < I; ++i) o[i] = gate[i] / (1.f + fast_exp(-gate[i])) * up[i];
    }
  });
  return out;
}
"""


@cache
def cpu_ops():
    """The compiled kernels' module, or None where no compiler is available (the torch paths are used then)."""
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline("memshare_cpu_kernels", cpp_sources=_SOURCE,
                             functions=["paged_decode", "rms_norm", "fused_add_rms_norm", "rotary_embedding",
                                        "silu_and_mul"],
                             # fast-math: the dot products vectorize with reassociated sums (0.73 vs 1.26 ms a layer)
                             extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                             extra_ldflags=["-fopenmp"])
    except Exception as error:  # a missing compiler or ninja must not stop inference
        logger.warning("CPU kernels unavailable (%s); using the torch paths", error)
        return None
    return module


def kernel_applies(x: torch.Tensor) -> bool:
    """Whether the fused CPU kernels run on tensors like `x` (float32 on CPU, with a compiler at hand)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and cpu_ops() is not None
