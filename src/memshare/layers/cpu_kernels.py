"""Fused CPU kernels, compiled on first use with torch's C++ extension loader: paged-attention decode, the
decoder layer's small ops (RMSNorm with the residual add, rotary embedding, SiLU-and-mul; vLLM's names), and the
linear layers on float32 or quantized weights in panels (layers/linear.py).

Gathering each sequence's blocks into a dense tensor and then running small batched GEMMs reads the
context twice and spends most of its time in per-call overhead; this kernel walks the block table and
reads every key and value once, in parallel over sequences. Each sequence sweeps every KV head's keys of a
token together, as they lie in the cache: 1.9 -> 1.4 ms per layer of smollm2-135m at batch 32, context 245.
"""

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import cache

import torch

logger = logging.getLogger("memshare")

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
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
// fewer sequences than threads an item is one KV head of one sequence, and its context is split into S parts
// combined afterwards (flash-decoding), so that one long chain of thought keeps every thread busy. Quantized rows
// are dequantized into a D-float buffer per row, never into a copy of the cache.
template <int CODE>
static void decode_impl(const float* qp, float* op, const Plane& K, const Plane& V, const Layout& l,
                        const int64_t* tables, const int64_t* lens, int64_t B, int64_t H, int64_t W, float fscale) {
  const int64_t D = l.D, BS = l.BS, G = H / l.KVH, threads = at::get_num_threads();
  const int64_t heads_per_item = B >= 2 * threads ? l.KVH : 1;
  const int64_t items_per_seq = l.KVH / heads_per_item, R = heads_per_item * G;  // R: query rows of an item
  const int64_t max_len = *std::max_element(lens, lens + B);
  const int64_t S = std::max<int64_t>(1, std::min((2 * threads + B * items_per_seq - 1) / (B * items_per_seq),
                                                  max_len / 64));
  // Per item and split: the running max and sum of each query row's scores, and its unnormalized output.
  std::vector<float> part_max(S > 1 ? B * items_per_seq * S * R : 0), part_sum(part_max.size()),
      part_out(part_max.size() * D);
  at::parallel_for(0, B * items_per_seq * S, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score_buf, acc_buf(R * D), q_buf(R * D), row_buf(D), row_max(R), row_sum(R);
    ChannelScales k_channels(heads_per_item, D), v_channels(heads_per_item, D);
    for (int64_t work = begin; work < end; ++work) {
      const int64_t item = work / S, split = work % S;
      const int64_t b = item / items_per_seq, h0 = (item % items_per_seq) * heads_per_item, L = lens[b];
      const int64_t chunk = (L + S - 1) / S, t0 = std::min(L, split * chunk), t1 = std::min(L, t0 + chunk);
      const int64_t n = t1 - t0;
      score_buf.resize(R * std::max<int64_t>(n, 1));
      float* __restrict__ scores = score_buf.data();
      float* __restrict__ acc = acc_buf.data();
      float* __restrict__ qs = q_buf.data();
      const float* qb = qp + (b * H + h0 * G) * D;
      for (int64_t i = 0; i < R * D; ++i) qs[i] = qb[i] * fscale;
      const int64_t* table = tables + b * W;
      for (int64_t t = t0, blk = t0 / BS, off = t0 % BS; t < t1; ++t, off = off + 1 == BS ? 0 : off + 1,
           blk += off == 0) {  // no division per token
        for (int64_t hh = 0; hh < heads_per_item; ++hh) {
          const float* __restrict__ kh = load_row<CODE>(K, l, table[blk], off, h0 + hh, row_buf.data(),
                                                             k_channels);
          for (int64_t g = 0; g < G; ++g) {
            const float* __restrict__ qr = qs + (hh * G + g) * D;
            float dot = 0.f;
            for (int64_t d = 0; d < D; ++d) dot += qr[d] * kh[d];
            scores[(hh * G + g) * n + t - t0] = dot;
          }
        }
      }
      std::fill(row_max.begin(), row_max.end(), -INFINITY);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      for (int64_t r = 0; r < R && n > 0; ++r) {
        float* s = scores + r * n;
        float m = s[0];
        for (int64_t t = 1; t < n; ++t) m = std::max(m, s[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) { s[t] = fast_exp(s[t] - m); sum += s[t]; }
        const float inv = S > 1 ? 1.f : 1.f / sum;  // split parts stay unnormalized until combined
        for (int64_t t = 0; t < n; ++t) s[t] *= inv;
        row_max[r] = m;
        row_sum[r] = sum;
      }
      std::fill(acc, acc + R * D, 0.f);
      for (int64_t t = t0, blk = t0 / BS, off = t0 % BS; t < t1; ++t, off = off + 1 == BS ? 0 : off + 1,
           blk += off == 0) {  // no division per token
        for (int64_t hh = 0; hh < heads_per_item; ++hh) {
          const float* __restrict__ vh = load_row<CODE>(V, l, table[blk], off, h0 + hh, row_buf.data(),
                                                             v_channels);
          for (int64_t g = 0; g < G; ++g) {
            const float p = scores[(hh * G + g) * n + t - t0];
            float* __restrict__ a = acc + (hh * G + g) * D;
            for (int64_t d = 0; d < D; ++d) a[d] += p * vh[d];
          }
        }
      }
      if (S == 1) {
        std::copy(acc, acc + R * D, op + (b * H + h0 * G) * D);
      } else {
        std::copy(row_max.begin(), row_max.end(), part_max.begin() + work * R);
        std::copy(row_sum.begin(), row_sum.end(), part_sum.begin() + work * R);
        std::copy(acc, acc + R * D, part_out.begin() + work * R * D);
      }
    }
  });
  if (S == 1) return;
  for (int64_t item = 0; item < B * items_per_seq; ++item) {
    const int64_t b = item / items_per_seq, h0 = (item % items_per_seq) * heads_per_item;
    for (int64_t r = 0; r < R; ++r) {
      float m = -INFINITY, sum = 0.f;
      for (int64_t split = 0; split < S; ++split) m = std::max(m, part_max[(item * S + split) * R + r]);
      float* o = op + (b * H + h0 * G + r) * D;
      std::fill(o, o + D, 0.f);
      for (int64_t split = 0; split < S; ++split) {
        const int64_t i = (item * S + split) * R + r;
        if (part_sum[i] == 0.f) continue;  // an empty split
        const float w = fast_exp(part_max[i] - m);
        sum += w * part_sum[i];
        for (int64_t d = 0; d < D; ++d) o[d] += w * part_out[i * D + d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= sum;
    }
  }
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

_LINEAR_SOURCE = r"""
// Linear layers on weights stored in panels of NR = 16 output channels: a decode step streams each panel once, in
// order. Float32 panels [panels, K, NR] run through two 8-float registers per row of x: oneDNN's GEMV at one row
// spends ~50 us a call on small shapes here; these run at ~27 GB/s (the machine reads ~36) and match oneDNN from 32
// rows on. Quantized codes carry one scale d (and, asymmetric, a minimum m) per output channel and group of G
// inputs, w = d * q + m (GGUF's Q8_0, Q4_0 and Q4_1 blocks exactly), and meet x as int8 codes in integer dot
// products, as GGUF's own CPU and CUDA kernels do: at one row 2-3x faster than decoding the codes to float.
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

constexpr int64_t NR = 16, MR_MAX = 6, MI_MAX = 4, MB = 96;

// Named accumulators: GCC keeps an array of 12 vectors on the stack, 2x slower.
#define MS_ROWS(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5)
#define MS_DECL(r) __m256 c##r##a = _mm256_setzero_ps(), c##r##b = _mm256_setzero_ps();
#define MS_FMA(r) if constexpr (MR > r) { const __m256 a = _mm256_broadcast_ss(x + r * ldx + k); \
    c##r##a = _mm256_fmadd_ps(a, w0, c##r##a); c##r##b = _mm256_fmadd_ps(a, w1, c##r##b); }
#define MS_STORE(r) if constexpr (MR > r) { \
    _mm256_storeu_ps(out + r * NR, c##r##a); _mm256_storeu_ps(out + r * NR + 8, c##r##b); }

// out[MR][NR] = x[MR rows] @ w[K][NR]
template <int MR>
static inline void tile_f32(const float* __restrict__ x, int64_t ldx, const float* __restrict__ w, int64_t K,
                            float* __restrict__ out) {
  MS_ROWS(MS_DECL)
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(w + k * NR), w1 = _mm256_loadu_ps(w + k * NR + 8);
    MS_ROWS(MS_FMA)
  }
  MS_ROWS(MS_STORE)
}

struct PanelWeights {
  int64_t bits;  // 32: float32 panels [P, K, NR]; 8: int8 codes [P, K/4, NR, 4], four consecutive inputs of a
                 // channel side by side; 4: [P, K/4, 8, 4] bytes, channels 0-7 in the low nibbles, 8-15 in the high
  const void* data;
  const float *d, *m;  // [P, K/G, NR]; m null for symmetric codes
  int64_t K, N, G;
  int64_t panel_bytes() const { return K * NR * bits / 8; }
};

// x quantized to int8 per row and QK inputs (GGUF's Q8 activations): xq, their scales sx [M, K/QK], and x's exact
// sums per weight group (xsum [M, K/G]) for the minimum term. Integer dot products then do 32 (int4) or 16 (int8)
// multiply-adds per instruction where float needs a decode and two FMAs per 8.
constexpr int64_t QK = 32;
struct QuantizedX {
  std::vector<int8_t> q;
  std::vector<float> scale, sum;
  QuantizedX(const float* x, int64_t M, int64_t K, int64_t G) : q(M * K), scale(M * K / QK), sum(M * K / G) {
    for (int64_t i = 0; i < M * K / QK; ++i) {
      const float* xi = x + i * QK;
      float amax = 0.f;
      for (int64_t j = 0; j < QK; ++j) amax = std::max(amax, std::abs(xi[j]));
      scale[i] = amax / 127.f;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int64_t j = 0; j < QK; ++j) q[i * QK + j] = static_cast<int8_t>(std::nearbyint(xi[j] * inv));
    }
    for (int64_t i = 0; i < M * K / G; ++i) sum[i] = std::accumulate(x + i * G, x + (i + 1) * G, 0.f);
  }
};

#define MI_ROWS(OP) OP(0) OP(1) OP(2) OP(3)  // MI_MAX rows: more spill the integer accumulators
#define MI_DECL(r) __m256i i##r##a = _mm256_setzero_si256(), i##r##b = _mm256_setzero_si256();
#define MI_DOT4(r) if constexpr (MR > r) { const __m256i xb = _mm256_set1_epi32(xw[r * K / 4 + j]); \
    i##r##a = _mm256_add_epi16(i##r##a, _mm256_maddubs_epi16(w0, xb)); \
    i##r##b = _mm256_add_epi16(i##r##b, _mm256_maddubs_epi16(w1, xb)); }
#define MI_DOT8(r) if constexpr (MR > r) { const __m256i xb = _mm256_set1_epi32(xw[r * K / 4 + j]); \
    i##r##a = _mm256_add_epi32(i##r##a, _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(xb, w0)), ones)); \
    i##r##b = _mm256_add_epi32(i##r##b, _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(xb, w1)), ones)); }
#define MI_SCALE(r) if constexpr (MR > r) { \
    if constexpr (BITS == 4) { \
      i##r##a = _mm256_madd_epi16(i##r##a, ones); i##r##b = _mm256_madd_epi16(i##r##b, ones); } \
    const __m256 s = _mm256_set1_ps(x.scale[(row0 + r) * nsub + sub]); float* o = out + r * NR; \
    _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(i##r##a), _mm256_mul_ps(d0, s), _mm256_loadu_ps(o))); \
    _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(i##r##b), _mm256_mul_ps(d1, s), \
                                            _mm256_loadu_ps(o + 8))); }

// out[MR][NR] = xq[MR rows] . codes per QK inputs, scaled by d * sx; then + m * xsum per group. With 4-bit codes
// (0..15) eight maddubs results fit int16 (8 * 2 * 15 * 127 < 2^15); signed int8 codes go through |w| and sign(x, w).
template <int MR, int BITS>
static inline void tile_int(const QuantizedX& x, int64_t row0, const PanelWeights& p, int64_t panel,
                            float* __restrict__ out) {
  const int64_t K = p.K, nsub = K / QK, ngroups = K / p.G;
  const int32_t* xw = reinterpret_cast<const int32_t*>(x.q.data() + row0 * K);
  const uint8_t* codes = static_cast<const uint8_t*>(p.data) + panel * p.panel_bytes();
  const float *d = p.d + panel * ngroups * NR, *m = p.m ? p.m + panel * ngroups * NR : nullptr;
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(15);
  std::fill(out, out + MR * NR, 0.f);
  for (int64_t sub = 0; sub < nsub; ++sub) {
    MI_ROWS(MI_DECL)
    for (int64_t j = sub * QK / 4; j < (sub + 1) * QK / 4; ++j) {
      if constexpr (BITS == 4) {
        const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + j * 32));
        const __m256i w0 = _mm256_and_si256(c, low4), w1 = _mm256_and_si256(_mm256_srli_epi16(c, 4), low4);
        MI_ROWS(MI_DOT4)
      } else {
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + j * 64));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + j * 64 + 32));
        const __m256i a0 = _mm256_abs_epi8(w0), a1 = _mm256_abs_epi8(w1);
        MI_ROWS(MI_DOT8)
      }
    }
    const float* dg = d + (sub * QK / p.G) * NR;
    const __m256 d0 = _mm256_loadu_ps(dg), d1 = _mm256_loadu_ps(dg + 8);
    MI_ROWS(MI_SCALE)
  }
  for (int64_t g = 0; m && g < ngroups; ++g) {
    const __m256 m0 = _mm256_loadu_ps(m + g * NR), m1 = _mm256_loadu_ps(m + g * NR + 8);
    for (int64_t r = 0; r < MR; ++r) {
      const __m256 s = _mm256_set1_ps(x.sum[(row0 + r) * ngroups + g]);
      _mm256_storeu_ps(out + r * NR, _mm256_fmadd_ps(m0, s, _mm256_loadu_ps(out + r * NR)));
      _mm256_storeu_ps(out + r * NR + 8, _mm256_fmadd_ps(m1, s, _mm256_loadu_ps(out + r * NR + 8)));
    }
  }
}

template <int BITS>
static void int_tiles(const PanelWeights& p, int64_t panel, const QuantizedX& xq, int64_t row0, int64_t M,
                      float* acc) {
  for (int64_t r = 0; r < M; r += MI_MAX) {
    switch (std::min(MI_MAX, M - r)) {
      case 1: tile_int<1, BITS>(xq, row0 + r, p, panel, acc + r * NR); break;
      case 2: tile_int<2, BITS>(xq, row0 + r, p, panel, acc + r * NR); break;
      case 3: tile_int<3, BITS>(xq, row0 + r, p, panel, acc + r * NR); break;
      default: tile_int<4, BITS>(xq, row0 + r, p, panel, acc + r * NR); break;
    }
  }
}

static void f32_tiles(const PanelWeights& p, int64_t panel, const float* x, int64_t M, float* acc) {
  const float* w = static_cast<const float*>(p.data) + panel * p.K * NR;
  for (int64_t r = 0; r < M; r += MR_MAX) {
    const float* xr = x + r * p.K;
    switch (std::min(MR_MAX, M - r)) {
      case 1: tile_f32<1>(xr, p.K, w, p.K, acc + r * NR); break;
      case 2: tile_f32<2>(xr, p.K, w, p.K, acc + r * NR); break;
      case 3: tile_f32<3>(xr, p.K, w, p.K, acc + r * NR); break;
      case 4: tile_f32<4>(xr, p.K, w, p.K, acc + r * NR); break;
      case 5: tile_f32<5>(xr, p.K, w, p.K, acc + r * NR); break;
      default: tile_f32<6>(xr, p.K, w, p.K, acc + r * NR); break;
    }
  }
}

// y[row0:row0 + M, panel's columns] = x @ panel + bias, M <= MB; acc holds MB x NR floats. Quantized weights run
// on xq, x's int8 codes.
static void panel_rows(const PanelWeights& p, int64_t panel, const float* x, const QuantizedX* xq, int64_t row0,
                       int64_t M, const float* bias, float* y, float* acc) {
  if (!xq) f32_tiles(p, panel, x + row0 * p.K, M, acc);
  else if (p.bits == 4) int_tiles<4>(p, panel, *xq, row0, M, acc);
  else int_tiles<8>(p, panel, *xq, row0, M, acc);
  const int64_t n0 = panel * NR, cols = std::min(NR, p.N - n0);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t j = 0; j < cols; ++j) y[(row0 + r) * p.N + n0 + j] = acc[r * NR + j] + (bias ? bias[n0 + j] : 0.f);
}

// x [..., K] -> [..., N]. Threads split the panels; rows go in blocks of MB so a block of x stays in cache.
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor data, torch::Tensor d, torch::Tensor m, torch::Tensor bias,
                           int64_t bits, int64_t N, int64_t G) {
  x = x.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / K, P = (N + NR - 1) / NR;
  auto shape = x.sizes().vec();
  shape.back() = N;
  auto y = torch::empty(shape, x.options());
  const PanelWeights p{bits, data.data_ptr(), d.numel() ? d.data_ptr<float>() : nullptr,
                       m.numel() ? m.data_ptr<float>() : nullptr, K, N, G};
  const float* xp = x.data_ptr<float>();
  TORCH_CHECK(bits == 32 || G % QK == 0, "panel_linear: quantization groups must be multiples of ", QK, " inputs");
  const std::unique_ptr<QuantizedX> xq(bits != 32 ? new QuantizedX(xp, M, K, G) : nullptr);
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(MB * NR);
    for (int64_t r = 0; r < M; r += MB)
      for (int64_t panel = begin; panel < end; ++panel)
        panel_rows(p, panel, xp, xq.get(), r, std::min(MB, M - r), bp, yp, acc.data());
  });
  return y;
}
#else
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor data, torch::Tensor d, torch::Tensor m, torch::Tensor bias,
                           int64_t bits, int64_t N, int64_t G) {
  TORCH_CHECK(false, "panel_linear needs a CPU with AVX2 and FMA");
}
#endif

bool panel_linear_available() {
#if defined(__AVX2__) && defined(__FMA__)
  return true;
#else
  return false;
#endif
}
"""

_STACK_SOURCE = r"""
// A decode step's decoder layers in one call (models/llama.py): at one sequence the ~10 Python-dispatched ops per
// layer cost more than the layer's GEMMs on quantized weights. Float32 KV, panel weights; the ops are those above.
// weights: per layer the two norm weights, then (data, d, m, bias) of qkv, o, gate_up, down; shapes: per layer
// (bits, N, G) of the same four; kv: per layer K and V codes [num_blocks, block_size, kv_heads, D].
std::vector<torch::Tensor> decode_layers(torch::Tensor hidden, torch::Tensor cos, torch::Tensor sin,
                                         torch::Tensor slot_mapping, torch::Tensor block_tables,
                                         torch::Tensor context_lens, std::vector<torch::Tensor> weights,
                                         std::vector<int64_t> shapes, std::vector<torch::Tensor> kv,
                                         int64_t num_heads, int64_t num_kv_heads, int64_t D, double eps,
                                         double scale) {
  const int64_t B = hidden.size(0), q_size = num_heads * D, kv_size = num_kv_heads * D;
  const auto none = torch::empty({0}, hidden.options());
  const auto none_long = torch::empty({0}, block_tables.options());
  const auto lut = torch::zeros({256}, hidden.options());
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  auto linear = [&](const torch::Tensor& x, size_t layer, int which) {
    const torch::Tensor* w = &weights[layer * 18 + 2 + which * 4];
    const int64_t* s = &shapes[layer * 12 + which * 3];
    return panel_linear(x, w[0], w[1], w[2], w[3], s[0], s[1], s[2]);
  };
  torch::Tensor residual = hidden;
  hidden = rms_norm(hidden, weights[0], eps);
  for (size_t layer = 0; layer < kv.size() / 2; ++layer) {
    if (layer > 0) fused_add_rms_norm(hidden, residual, weights[layer * 18], eps);
    auto qkv = linear(hidden, layer, 0);
    auto q = qkv.narrow(1, 0, q_size).view({B, num_heads, D});
    auto k = qkv.narrow(1, q_size, kv_size).view({B, num_kv_heads, D});
    auto v = qkv.narrow(1, q_size + kv_size, kv_size);
    rotary_embedding(q, k, cos, sin);
    float *k_cache = kv[2 * layer].data_ptr<float>(), *v_cache = kv[2 * layer + 1].data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      std::copy_n(k.data_ptr<float>() + b * qkv.size(1), kv_size, k_cache + slots[b] * kv_size);
      std::copy_n(v.data_ptr<float>() + b * qkv.size(1), kv_size, v_cache + slots[b] * kv_size);
    }
    auto attn = paged_decode(q, kv[2 * layer], none, none, 0, kv[2 * layer + 1], none, none, 0, lut, 0, none,
                             none, none, none, none_long, block_tables, context_lens, scale);
    hidden = linear(attn.view({B, q_size}), layer, 1);
    fused_add_rms_norm(hidden, residual, weights[layer * 18 + 1], eps);
    hidden = linear(silu_and_mul(linear(hidden, layer, 2)), layer, 3);
  }
  return {hidden, residual};
}
"""


@cache
def cpu_ops():
    """The compiled kernels' module, or None where no compiler is available (the torch paths are used then)."""
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline("memshare_cpu_kernels", cpp_sources=_SOURCE + _LINEAR_SOURCE + _STACK_SOURCE,
                             functions=["paged_decode", "rms_norm", "fused_add_rms_norm", "rotary_embedding",
                                        "silu_and_mul", "panel_linear", "panel_linear_available",
                                        "decode_layers"],
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


def kernel_range(name: Callable[[], str]) -> AbstractContextManager:
    """A profiler range named `name()` around a kernel call while a profiler runs (bench/decode_profile.py reads
    them: the profiler does not see extension calls), nothing otherwise: a range costs ~25 us a call."""
    if not torch.autograd.profiler._is_profiler_enabled:
        return nullcontext()
    return torch.profiler.record_function(name())
