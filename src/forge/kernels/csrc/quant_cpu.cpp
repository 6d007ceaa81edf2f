// Forge's CPU quantized matmuls: int4 and int8 weights in blocks of 32, against activations quantized to int8
// per block of 32 (llama.cpp's method: integer dot products, one float multiply-add per block).
//
// Weights, per output row n and block b of 32 input columns:
//   int4: qs (N, K/2) uint8, block b's 16 bytes hold its elements 0..15 in the low nibbles and 16..31 in the
//         high nibbles (GGUF Q4_0/Q4_1 order); w = d[n, g] * q + m[n, g], q in 0..15, g = b / (group / 32).
//   int8: qs (N, K) int8; w = d[n, g] * q (+ m[n, g] if m is given) (GGUF Q8_0 when group == 32, no m).
// d and m are fp32 (N, K / group). Activations x (M, K) fp32 or bf16; y (M, N) fp32.
// The activations' blocks: xq int8 and dx = max|x| / 127, and sx = dx * sum(xq) for the int4 minimum term.
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
  std::vector<int8_t> q;
  std::vector<float> d, s;  // per block of 32: the scale, and scale * sum(q) (exact: the block's sum of x)
  std::vector<float> f;     // exact: x itself, in fp32
  int64_t M, K;
};

template <typename T>
void copy_row(const T* x, int64_t K, float* f, float* sums) {
  for (int64_t b = 0; b < K / kBlock; ++b) {
    float sum = 0.f;
    for (int i = 0; i < kBlock; ++i) sum += (f[b * kBlock + i] = static_cast<float>(x[b * kBlock + i]));
    sums[b] = sum;
  }
}

// The activations as the dot products read them: int8 blocks (llama.cpp's method), or exact fp32 with block sums.
Acts prepare_acts(const at::Tensor& x, bool exact) {
  const int64_t M = x.size(0), K = x.size(1), nb = K / kBlock;
  Acts a{std::vector<int8_t>(exact ? 0 : M * K), std::vector<float>(M * nb), std::vector<float>(M * nb),
         std::vector<float>(exact ? M * K : 0), M, K};
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      if (exact && bf16) copy_row(x.data_ptr<at::BFloat16>() + m * K, K, &a.f[m * K], &a.s[m * nb]);
      if (exact && !bf16) copy_row(x.data_ptr<float>() + m * K, K, &a.f[m * K], &a.s[m * nb]);
      if (!exact && bf16) quantize_row(x.data_ptr<at::BFloat16>() + m * K, K, &a.q[m * K], &a.d[m * nb], &a.s[m * nb]);
      if (!exact && !bf16) quantize_row(x.data_ptr<float>() + m * K, K, &a.q[m * K], &a.d[m * nb], &a.s[m * nb]);
    }
  });
  return a;
}

template <bool Int4>
inline __m256 widen(__m128i v) {  // 8 weight bytes -> 8 floats
  return _mm256_cvtepi32_ps(Int4 ? _mm256_cvtepu8_epi32(v) : _mm256_cvtepi8_epi32(v));
}

// Exact: one weight block against R fp32 activation rows, fp32 multiply-adds: acc[r] += (w . x_r) * d.
template <bool Int4, int R>
inline void block_dot_exact(const uint8_t* wq, float d, const Acts& a, int64_t m0, int64_t b, __m256* acc) {
  const __m256i w = Int4 ? unpack_nibbles(wq) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq));
  const __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
  const __m256 w0 = widen<Int4>(lo), w1 = widen<Int4>(_mm_srli_si128(lo, 8));
  const __m256 w2 = widen<Int4>(hi), w3 = widen<Int4>(_mm_srli_si128(hi, 8));
  const __m256 dv = _mm256_set1_ps(d);
  for (int r = 0; r < R; ++r) {
    const float* x = &a.f[(m0 + r) * a.K + b * kBlock];
    __m256 s = _mm256_mul_ps(w0, _mm256_loadu_ps(x));
    s = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 8), s);
    s = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + 16), s);
    s = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + 24), s);
    acc[r] = _mm256_fmadd_ps(s, dv, acc[r]);
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
template <bool Int4, bool Exact, int R, typename S, typename Y>
void gemm_rows(const uint8_t* qs, const S* wd, const S* wm, const Acts& a, int64_t group, int64_t n,
               int64_t m0, Y* y, int64_t N) {
  const int64_t K = a.K, nb = K / kBlock, per = group / kBlock, ng = K / group;
  const int64_t stride = Int4 ? 16 : kBlock;  // bytes per block
  __m256 acc[R];
  float mins[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), mins[r] = 0.f;
  const uint8_t* row = qs + n * nb * stride;
  for (int64_t g = 0; g < ng; ++g) {
    const float d = static_cast<float>(wd[n * ng + g]);
    for (int64_t j = 0; j < per; ++j) {
      const int64_t b = g * per + j;
      if constexpr (Exact) {
        block_dot_exact<Int4, R>(row + b * stride, d, a, m0, b, acc);
      } else {
        block_dot<Int4, R>(row + b * stride, d, a, m0, b, acc);
      }
    }
    if (wm != nullptr) {
      const float mn = static_cast<float>(wm[n * ng + g]);
      for (int r = 0; r < R; ++r) {
        float s = 0.f;
        for (int64_t j = 0; j < per; ++j) s += a.s[(m0 + r) * nb + g * per + j];
        mins[r] += mn * s;
      }
    }
  }
  for (int r = 0; r < R; ++r) y[(m0 + r) * N + n] = static_cast<Y>(hsum(acc[r]) + mins[r]);
}

template <bool Int4, bool Exact, typename S, typename Y>
void run(const Acts& a, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t group, at::Tensor& y) {
  const int64_t M = a.M, N = qs.size(0);
  const uint8_t* q = reinterpret_cast<const uint8_t*>(qs.data_ptr());
  const S* wd = d.data_ptr<S>();
  const S* wm = m.defined() ? m.data_ptr<S>() : nullptr;
  Y* out = y.data_ptr<Y>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int64_t m0 = 0;
      for (; m0 + kRows <= M; m0 += kRows) gemm_rows<Int4, Exact, kRows>(q, wd, wm, a, group, n, m0, out, N);
      for (; m0 < M; ++m0) gemm_rows<Int4, Exact, 1>(q, wd, wm, a, group, n, m0, out, N);
    }
  });
}

template <bool Int4, bool Exact>
void dispatch(const Acts& a, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t group,
              at::Tensor& y, bool half, bool bf16) {
  if (half && bf16) run<Int4, Exact, at::Half, at::BFloat16>(a, qs, d, m, group, y);
  if (half && !bf16) run<Int4, Exact, at::Half, float>(a, qs, d, m, group, y);
  if (!half && bf16) run<Int4, Exact, float, at::BFloat16>(a, qs, d, m, group, y);
  if (!half && !bf16) run<Int4, Exact, float, float>(a, qs, d, m, group, y);
}

template <bool Int4>
at::Tensor qmm(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t group,
               bool exact) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "forge quant mm: x must be a contiguous (M, K) tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "forge quant mm: x fp32 or bf16");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  TORCH_CHECK(K % group == 0 && group % kBlock == 0, "forge quant mm: group must divide K and be a multiple of 32");
  TORCH_CHECK(qs.is_contiguous() && qs.size(1) == (Int4 ? K / 2 : K), "forge quant mm: weight width does not match x");
  TORCH_CHECK(d.is_contiguous() && d.size(0) == N && d.size(1) == K / group, "forge quant mm: scales (N, K/group)");
  TORCH_CHECK(d.scalar_type() == at::kHalf || d.scalar_type() == at::kFloat, "forge quant mm: scales fp16 or fp32");
  TORCH_CHECK(!m.defined() || (m.scalar_type() == d.scalar_type() && m.sizes() == d.sizes() && m.is_contiguous()),
              "forge quant mm: minimums like scales");
  const Acts a = prepare_acts(x, exact);
  at::Tensor y = at::empty({M, N}, x.options());
  const bool half = d.scalar_type() == at::kHalf, bf16 = x.scalar_type() == at::kBFloat16;
  if (exact) {
    dispatch<Int4, true>(a, qs, d, m, group, y, half, bf16);
  } else {
    dispatch<Int4, false>(a, qs, d, m, group, y, half, bf16);
  }
  return y;
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t group,
                   bool exact) {
  return qmm<true>(x, qs, d, m, group, exact);
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const std::optional<at::Tensor>& m,
                   int64_t group, bool exact) {
  return qmm<false>(x, qs, d, m.has_value() ? *m : at::Tensor(), group, exact);
}

}  // namespace

TORCH_LIBRARY(forge_cpu, lib) {
  lib.def("int4_mm(Tensor x, Tensor qs, Tensor d, Tensor m, int group, bool exact=True) -> Tensor");
  lib.def("int8_mm(Tensor x, Tensor qs, Tensor d, Tensor? m, int group, bool exact=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(forge_cpu, CPU, lib) {
  lib.impl("int4_mm", &int4_mm);
  lib.impl("int8_mm", &int8_mm);
}
