// Forge's CPU quantized matmuls: int4 and int8 weights in blocks of 32, against activations rounded per block of
// 32 to integers, so that each block's dot product is integer arithmetic with one float multiply-add for the scales.
//
// Weights, per output row n and block b of 32 input columns:
//   int4: qs (N, K/2) uint8, block b's 16 bytes hold its elements 0..15 in the low nibbles and 16..31 in the
//         high nibbles (GGUF Q4_0/Q4_1 order); w = d[n, g] * q + m[n, g], q in 0..15, g = b / (group / 32).
//   int8: qs (N, K) int8; w = d[n, g] * q (+ m[n, g] if m is given) (GGUF Q8_0 when group == 32, no m).
// d and m are fp16 or fp32 (N, K / group). Activations x (M, K) fp32 or bf16; y (M, N) in x's dtype.
// The activations' blocks, precise (the default): int16 with dx = max|x| / 32767 (madd_epi16), and the block's sum
// for the minimum term; or llama.cpp's int8 with dx = max|x| / 127 (maddubs), and dx * sum(xq).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;

constexpr int kRows = 4;  // rows of the batch a weight block is reused for

inline float to_f32(at::Half h) { return _cvtsh_ss(h.x); }  // F16C: one instruction, not c10's bit twiddling
inline float to_f32(float f) { return f; }

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// One row's K activations -> int8 blocks. Returns nothing; fills xq (K), dx (K/32), sx (K/32).
template <typename T>
void quantize_row(const T* x, int64_t K, int8_t* xq, float* dx, float* sx) {
  for (int64_t b = 0; b < K / kBlock; ++b) {
    float v[kBlock];
    float amax = 0.f;
    for (int i = 0; i < kBlock; ++i) {
      v[i] = static_cast<float>(x[b * kBlock + i]);
      amax = std::max(amax, std::fabs(v[i]));
    }
    const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    int sum = 0;
    for (int i = 0; i < kBlock; ++i) {
      const int q = static_cast<int>(std::nearbyint(v[i] * inv));
      xq[b * kBlock + i] = static_cast<int8_t>(q);
      sum += q;
    }
    dx[b] = d;
    sx[b] = d * static_cast<float>(sum);
  }
}

// sum over a block of u[i] * s[i], u unsigned 0..15 or 0..255 bytes, s signed int8: 8 int32 lanes as float.
inline __m256 dot_us(__m256i u, __m256i s) {
  const __m256i p16 = _mm256_maddubs_epi16(u, s);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

inline __m256i unpack_nibbles(const uint8_t* q) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  return _mm256_set_m128i(hi, lo);  // elements 0..15, then 16..31
}

struct Acts {
  std::vector<int8_t> q;    // int8 mode: the activations rounded to int8 per block
  std::vector<int16_t> q16;  // precise mode: rounded to int16 per block
  std::vector<float> d, s;  // per block of 32: the scale, and the block's sum (int8: scale * sum(q); precise: of x)
  int64_t M, K;
};

// Precise: a row's K activations as int16 per block of 32 (scale max|x| / 32767), and each block's sum.
template <typename T>
void quantize_row16(const T* x, int64_t K, int16_t* xq, float* dx, float* sx) {
  for (int64_t b = 0; b < K / kBlock; ++b) {
    float v[kBlock];
    float amax = 0.f, sum = 0.f;
    for (int i = 0; i < kBlock; ++i) {
      v[i] = static_cast<float>(x[b * kBlock + i]);
      amax = std::max(amax, std::fabs(v[i]));
      sum += v[i];
    }
    const float d = amax / 32767.f, inv = d > 0.f ? 1.f / d : 0.f;
    for (int i = 0; i < kBlock; ++i) xq[b * kBlock + i] = static_cast<int16_t>(std::nearbyint(v[i] * inv));
    dx[b] = d;
    sx[b] = sum;
  }
}

// The activations as the dot products read them: int8 blocks (llama.cpp's method), or int16 blocks (precise).
Acts prepare_acts(const at::Tensor& x, bool precise) {
  const int64_t M = x.size(0), K = x.size(1), nb = K / kBlock;
  Acts a{std::vector<int8_t>(precise ? 0 : M * K), std::vector<int16_t>(precise ? M * K : 0),
         std::vector<float>(M * nb), std::vector<float>(M * nb), M, K};
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      float* d = &a.d[m * nb];
      float* s = &a.s[m * nb];
      if (precise && bf16) quantize_row16(x.data_ptr<at::BFloat16>() + m * K, K, &a.q16[m * K], d, s);
      if (precise && !bf16) quantize_row16(x.data_ptr<float>() + m * K, K, &a.q16[m * K], d, s);
      if (!precise && bf16) quantize_row(x.data_ptr<at::BFloat16>() + m * K, K, &a.q[m * K], d, s);
      if (!precise && !bf16) quantize_row(x.data_ptr<float>() + m * K, K, &a.q[m * K], d, s);
    }
  });
  return a;
}

// Precise: one weight block against R int16 activation rows: acc[r] += (w . xq_r) * d * dx_r, integer dots.
template <bool Int4, int R>
inline void block_dot_precise(const uint8_t* wq, float d, const Acts& a, int64_t m0, int64_t b, __m256* acc) {
  const int64_t K = a.K, nb = K / kBlock;
  const __m256i w = Int4 ? unpack_nibbles(wq) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq));
  const __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
  const __m256i w0 = Int4 ? _mm256_cvtepu8_epi16(lo) : _mm256_cvtepi8_epi16(lo);  // values 0..15
  const __m256i w1 = Int4 ? _mm256_cvtepu8_epi16(hi) : _mm256_cvtepi8_epi16(hi);  // values 16..31
  for (int r = 0; r < R; ++r) {
    const int64_t m = m0 + r;
    const int16_t* x = &a.q16[m * K + b * kBlock];
    const __m256i p = _mm256_add_epi32(
        _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
        _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * a.d[m * nb + b]), acc[r]);
  }
}

// One weight block (32 values) against R activation rows: acc[r] += (w . x_r) * d * dx_r.
template <bool Int4, int R>
inline void block_dot(const uint8_t* wq, float d, const Acts& a, int64_t m0, int64_t b, __m256* acc) {
  const int64_t K = a.K, nb = K / kBlock;
  __m256i w;
  if constexpr (Int4) {
    w = unpack_nibbles(wq);
  } else {
    w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq));
  }
  const __m256i wabs = Int4 ? w : _mm256_sign_epi8(w, w);
  for (int r = 0; r < R; ++r) {
    const int64_t m = m0 + r;
    __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&a.q[m * K + b * kBlock]));
    if constexpr (!Int4) x = _mm256_sign_epi8(x, w);  // signed x signed: move w's sign onto x (llama.cpp's trick)
    acc[r] = _mm256_fmadd_ps(dot_us(wabs, x), _mm256_set1_ps(d * a.d[m * nb + b]), acc[r]);
  }
}

// Output n for activation rows m0..m0+R-1.
template <bool Int4, bool Precise, int R>
inline void block(const uint8_t* wq, float d, const Acts& a, int64_t m0, int64_t b, __m256* acc) {
  if constexpr (Precise) {
    block_dot_precise<Int4, R>(wq, d, a, m0, b, acc);
  } else {
    block_dot<Int4, R>(wq, d, a, m0, b, acc);
  }
}

// Output n for activation rows m0..m0+R-1. Two accumulators (even and odd blocks) keep two FMA chains in flight;
// the minimums' term is the group's minimum times the group's activation sum (``gs``, computed once per call).
template <bool Int4, bool Precise, int R, typename S, typename Y>
void gemm_rows(const uint8_t* qs, const S* wd, const S* wm, const Acts& a, const float* gs, int64_t group,
               int64_t n, int64_t m0, Y* y, int64_t N) {
  const int64_t K = a.K, nb = K / kBlock, per = group / kBlock, ng = K / group;
  const int64_t stride = Int4 ? 16 : kBlock;  // bytes per block
  __m256 even[R], odd[R];
  float mins[R];
  for (int r = 0; r < R; ++r) even[r] = _mm256_setzero_ps(), odd[r] = _mm256_setzero_ps(), mins[r] = 0.f;
  const uint8_t* row = qs + n * nb * stride;
  const S* d = wd + n * ng;
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {
    block<Int4, Precise, R>(row + b * stride, to_f32(d[b / per]), a, m0, b, even);
    block<Int4, Precise, R>(row + (b + 1) * stride, to_f32(d[(b + 1) / per]), a, m0, b + 1, odd);
  }
  if (b < nb) block<Int4, Precise, R>(row + b * stride, to_f32(d[b / per]), a, m0, b, even);
  if (wm != nullptr) {
    const S* mn = wm + n * ng;
    for (int64_t g = 0; g < ng; ++g) {
      const float v = to_f32(mn[g]);
      for (int r = 0; r < R; ++r) mins[r] += v * gs[(m0 + r) * ng + g];
    }
  }
  for (int r = 0; r < R; ++r) y[(m0 + r) * N + n] = static_cast<Y>(hsum(_mm256_add_ps(even[r], odd[r])) + mins[r]);
}

template <bool Int4, bool Precise, typename S, typename Y>
void run(const Acts& a, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t group, at::Tensor& y) {
  const int64_t M = a.M, N = qs.size(0);
  const uint8_t* q = reinterpret_cast<const uint8_t*>(qs.data_ptr());
  const S* wd = d.data_ptr<S>();
  const S* wm = m.defined() ? m.data_ptr<S>() : nullptr;
  Y* out = y.data_ptr<Y>();
  const int64_t nb = a.K / kBlock, per = group / kBlock, ng = a.K / group;
  std::vector<float> gs(wm != nullptr ? M * ng : 0);  // each row's activation sum per group
  for (int64_t i = 0; i < static_cast<int64_t>(gs.size()); ++i) {
    for (int64_t j = 0; j < per; ++j) gs[i] += a.s[i / ng * nb + i % ng * per + j];
  }
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int64_t m0 = 0;
      for (; m0 + kRows <= M; m0 += kRows) gemm_rows<Int4, Precise, kRows>(q, wd, wm, a, gs.data(), group, n, m0, out, N);
      for (; m0 < M; ++m0) gemm_rows<Int4, Precise, 1>(q, wd, wm, a, gs.data(), group, n, m0, out, N);
    }
  });
}

template <bool Int4, bool Precise>
void dispatch(const Acts& a, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t group,
              at::Tensor& y, bool half, bool bf16) {
  if (half && bf16) run<Int4, Precise, at::Half, at::BFloat16>(a, qs, d, m, group, y);
  if (half && !bf16) run<Int4, Precise, at::Half, float>(a, qs, d, m, group, y);
  if (!half && bf16) run<Int4, Precise, float, at::BFloat16>(a, qs, d, m, group, y);
  if (!half && !bf16) run<Int4, Precise, float, float>(a, qs, d, m, group, y);
}

template <bool Int4>
at::Tensor qmm(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t group,
               bool precise) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "forge quant mm: x must be a contiguous (M, K) tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "forge quant mm: x fp32 or bf16");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  TORCH_CHECK(K % group == 0 && group % kBlock == 0, "forge quant mm: group must divide K and be a multiple of 32");
  TORCH_CHECK(qs.is_contiguous() && qs.size(1) == (Int4 ? K / 2 : K), "forge quant mm: weight width does not match x");
  TORCH_CHECK(d.is_contiguous() && d.size(0) == N && d.size(1) == K / group, "forge quant mm: scales (N, K/group)");
  TORCH_CHECK(d.scalar_type() == at::kHalf || d.scalar_type() == at::kFloat, "forge quant mm: scales fp16 or fp32");
  TORCH_CHECK(!m.defined() || (m.scalar_type() == d.scalar_type() && m.sizes() == d.sizes() && m.is_contiguous()),
              "forge quant mm: minimums like scales");
  const Acts a = prepare_acts(x, precise);
  at::Tensor y = at::empty({M, N}, x.options());
  const bool half = d.scalar_type() == at::kHalf, bf16 = x.scalar_type() == at::kBFloat16;
  if (precise) {
    dispatch<Int4, true>(a, qs, d, m, group, y, half, bf16);
  } else {
    dispatch<Int4, false>(a, qs, d, m, group, y, half, bf16);
  }
  return y;
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t group,
                   bool precise) {
  return qmm<true>(x, qs, d, m, group, precise);
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const std::optional<at::Tensor>& m,
                   int64_t group, bool precise) {
  return qmm<false>(x, qs, d, m.has_value() ? *m : at::Tensor(), group, precise);
}

}  // namespace

TORCH_LIBRARY(forge_cpu, lib) {
  lib.def("int4_mm(Tensor x, Tensor qs, Tensor d, Tensor m, int group, bool precise=True) -> Tensor");
  lib.def("int8_mm(Tensor x, Tensor qs, Tensor d, Tensor? m, int group, bool precise=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(forge_cpu, CPU, lib) {
  lib.impl("int4_mm", &int4_mm);
  lib.impl("int8_mm", &int8_mm);
}
