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
#include <cstring>
#include <type_traits>
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

// Block b (32 values) of a row of activations as floats in v; returns its largest |value|, its sum in *sum.
template <typename T>
inline float load_block(const T* x, int64_t b, float* v, float* sum) {
  float amax = 0.f, total = 0.f;
  for (int i = 0; i < kBlock; ++i) {
    v[i] = static_cast<float>(x[b * kBlock + i]);
    amax = std::max(amax, std::fabs(v[i]));
    total += v[i];
  }
  *sum = total;
  return amax;
}

// One row's K activations -> int8 blocks. Returns nothing; fills xq (K), dx (K/32), sx (K/32).
template <typename T>
void quantize_row(const T* x, int64_t K, int8_t* xq, float* dx, float* sx) {
  for (int64_t b = 0; b < K / kBlock; ++b) {
    float v[kBlock], unused;
    const float amax = load_block(x, b, v, &unused);
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
    float v[kBlock], sum;
    const float amax = load_block(x, b, v, &sum);
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

// Each row's activation sum per group of the weight's scales (for the minimums' term): from the blocks' sums.
std::vector<float> group_sums(const std::vector<float>& s, int64_t M, int64_t K, int64_t group, bool needed) {
  const int64_t nb = K / kBlock, per = group / kBlock, ng = K / group;
  std::vector<float> gs(needed ? M * ng : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(gs.size()); ++i) {
    for (int64_t j = 0; j < per; ++j) gs[i] += s[i / ng * nb + i % ng * per + j];
  }
  return gs;
}

template <bool Int4, bool Precise, typename S, typename Y>
void run(const Acts& a, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t group, at::Tensor& y) {
  const int64_t M = a.M, N = qs.size(0);
  const uint8_t* q = reinterpret_cast<const uint8_t*>(qs.data_ptr());
  const S* wd = d.data_ptr<S>();
  const S* wm = m.defined() ? m.data_ptr<S>() : nullptr;
  Y* out = y.data_ptr<Y>();
  const std::vector<float> gs = group_sums(a.s, M, a.K, group, wm != nullptr);
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

// ---- AVX512-VNNI (precise mode, int4 decode): u8 x s8 dot products, 64 values an instruction ------------------
// The activations' int16 blocks are split into two int8 halves, x = 256 * hi + lo (|x| <= 32639, so both fit).
// A zmm holds two weight rows' pair of blocks, [row n's 32 bytes | row n + 1's]: the low nibbles are elements
// 0..15 of both blocks, the high ones 16..31, GGUF's order, so no shuffle. The activations are laid out to
// match, each 32-byte half twice, so dpbusd reads them from memory as they are. The int32 lanes 0-3 and 4-7 sum
// row n's two blocks, 8-11 and 12-15 row n + 1's. Scales and minimums are converted 8 pairs at a time.
#define FORGE_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

constexpr float kVnniMax = 32639.f;  // 127 * 256 + 127: the largest x whose two halves are both int8
#ifndef FORGE_PREFETCH_ROWS
#define FORGE_PREFETCH_ROWS 4
#endif
constexpr int64_t kPrefetchRows = FORGE_PREFETCH_ROWS;  // how far ahead the decode kernel prefetches
constexpr int64_t kChunk = 8;        // pairs of blocks whose scales are converted at once (16 fp16 values)

int vnni_mode = -1;  // -1: not decided yet; 0: off; 1: on

bool vnni_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

bool use_vnni() {
  if (vnni_mode < 0) vnni_mode = vnni_supported() ? 1 : 0;
  return vnni_mode == 1;
}

struct ActsV {
  std::vector<int8_t> hi, lo;  // (M, pairs, 2, 64): the low nibbles' activations, then the high ones', each twice
  std::vector<float> dx;       // (M, pairs, 16): each lane's block scale
  std::vector<float> sx;       // (M, pairs, 16): each block's sum of x in its first lane per row: 0, 4, 8, 12
  int64_t M, K, np;
};

// 16 activations as floats: fp32 as they are, bf16 widened (its bits are fp32's top half).
FORGE_VNNI inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
FORGE_VNNI inline __m512 load16(const at::BFloat16* x) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// One row of activations in the layout above, 16 values an instruction (nearest-even rounding, as nearbyint).
template <typename T>
FORGE_VNNI void quantize_row_vnni(const T* x, int64_t K, int8_t* hi, int8_t* lo, float* dx, float* sx) {
  std::memset(sx, 0, sizeof(float) * (K / kBlock / 2 * 16));
  const __m512i c128 = _mm512_set1_epi32(128), c255 = _mm512_set1_epi32(255);
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const int64_t p = b / 2, h = b % 2;
    const __m512 v[2] = {load16(x + b * kBlock), load16(x + b * kBlock + 16)};
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
    const float sum = _mm512_reduce_add_ps(_mm512_add_ps(v[0], v[1]));
    const float d = amax / kVnniMax, inv = d > 0.f ? 1.f / d : 0.f;
    for (int half = 0; half < 2; ++half) {  // elements 0..15, then 16..31
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[half], _mm512_set1_ps(inv)));
      // the low half, -128..127; q - l is a multiple of 256
      const __m512i l = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(q, c128), c255), c128);
      const __m128i l8 = _mm512_cvtepi32_epi8(l), h8 = _mm512_cvtepi32_epi8(_mm512_srai_epi32(_mm512_sub_epi32(q, l), 8));
      const int64_t at = p * 128 + half * 64 + h * 16;  // and again 32 bytes on
      _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + at), h8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + at + 32), h8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + at), l8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + at + 32), l8);
    }
    for (int j = 0; j < 4; ++j) dx[p * 16 + h * 4 + j] = d, dx[p * 16 + 8 + h * 4 + j] = d;
    sx[p * 16 + h * 4] = sx[p * 16 + 8 + h * 4] = sum;
  }
}

// The activations as the decode kernel reads them, in this thread's buffers (kept: no allocation per call).
const ActsV& prepare_acts_vnni(const at::Tensor& x) {
  thread_local ActsV a;
  const int64_t M = x.size(0), K = x.size(1), np = K / kBlock / 2;
  a.M = M, a.K = K, a.np = np;
  a.hi.resize(M * np * 128), a.lo.resize(M * np * 128), a.dx.resize(M * np * 16), a.sx.resize(M * np * 16);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  for (int64_t m = 0; m < M; ++m) {  // a few rows (decode): not worth a parallel region
    const int64_t o = m * np;
    if (bf16) {
      quantize_row_vnni(x.data_ptr<at::BFloat16>() + m * K, K, &a.hi[o * 128], &a.lo[o * 128], &a.dx[o * 16],
                        &a.sx[o * 16]);
    } else {
      quantize_row_vnni(x.data_ptr<float>() + m * K, K, &a.hi[o * 128], &a.lo[o * 128], &a.dx[o * 16],
                        &a.sx[o * 16]);
    }
  }
  return a;
}

// The scales (or minimums) of blocks b0 .. b0 + 2 * count - 1 of a row as 16 floats (count <= kChunk).
template <typename S>
FORGE_VNNI inline __m512 chunk_scales(const S* v, int64_t b0, int64_t count, int64_t per) {
  if constexpr (std::is_same_v<S, at::Half>) {
    if (per == 1) {  // contiguous fp16: one masked load, one conversion
      const __mmask16 mask = static_cast<__mmask16>((1u << (2 * count)) - 1);
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, v + b0));
    }
  }
  float f[16] = {};
  for (int64_t j = 0; j < 2 * count; ++j) f[j] = to_f32(v[(b0 + j) / per]);
  return _mm512_loadu_ps(f);
}

// Rows n and n + 1 (``single``: row n only, read twice) against activation row mrow.
template <bool Mins, typename S, typename Y>
FORGE_VNNI void two_rows_vnni(const uint8_t* qs, const S* wd, const S* wm, const ActsV& a, int64_t group, int64_t n,
                              bool single, int64_t mrow, Y* y, int64_t N) {
  const int64_t nb = a.K / kBlock, per = group / kBlock, ng = a.K / group, rowbytes = nb * 16;
  const int64_t next = single ? 0 : 1;  // row n + 1, or row n again
  const uint8_t* r0 = qs + n * rowbytes;
  const uint8_t* r1 = r0 + next * rowbytes;
  const uint8_t* ahead = r0 + kPrefetchRows * rowbytes;  // the rows a few tiles on: memory, not cache, bounds decode
  const __m512i mask = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
  const __m512i base = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 16, 16, 16, 16, 17, 17, 17, 17);
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t p0 = 0; p0 < a.np; p0 += kChunk) {
    const int64_t count = std::min(kChunk, a.np - p0);
    const __m512 d0 = chunk_scales(wd + n * ng, 2 * p0, count, per);
    const __m512 d1 = chunk_scales(wd + (n + next) * ng, 2 * p0, count, per);
    __m512 m0 = d0, m1 = d1;
    if constexpr (Mins) {
      m0 = chunk_scales(wm + n * ng, 2 * p0, count, per);
      m1 = chunk_scales(wm + (n + next) * ng, 2 * p0, count, per);
    }
    for (int64_t j = 0; j < count; ++j) {
      const int64_t p = p0 + j, o = mrow * a.np + p;
      _mm_prefetch(reinterpret_cast<const char*>(ahead + p * 32), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ahead + rowbytes + p * 32), _MM_HINT_T0);
      const __m512i raw = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + p * 32))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + p * 32)), 1);
      const __m512i lo = _mm512_and_si512(raw, mask), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
      const int8_t* xh = &a.hi[o * 128];
      const int8_t* xl = &a.lo[o * 128];
      const __m512i ih = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(xh)), hi,
                                             _mm512_loadu_si512(xh + 64));
      const __m512i il = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(xl)), hi,
                                             _mm512_loadu_si512(xl + 64));
      const __m512i i = _mm512_add_epi32(_mm512_slli_epi32(ih, 8), il);
      const __m512i idx = _mm512_add_epi32(base, _mm512_set1_epi32(static_cast<int>(2 * j)));  // this pair's lanes
      const __m512 dw = _mm512_permutex2var_ps(d0, idx, d1);
      __m512 r = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(dw, _mm512_loadu_ps(&a.dx[o * 16])), acc[j & 1]);
      if constexpr (Mins) r = _mm512_fmadd_ps(_mm512_permutex2var_ps(m0, idx, m1), _mm512_loadu_ps(&a.sx[o * 16]), r);
      acc[j & 1] = r;
    }
  }
  const __m512 v = _mm512_add_ps(acc[0], acc[1]);
  y[mrow * N + n] = static_cast<Y>(hsum(_mm512_castps512_ps256(v)));
  if (!single) y[mrow * N + n + 1] = static_cast<Y>(hsum(_mm512_extractf32x8_ps(v, 1)));
}

template <typename S, typename Y>
void run_vnni(const ActsV& a, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t group,
              at::Tensor& y) {
  const int64_t M = a.M, N = qs.size(0);
  const uint8_t* q = reinterpret_cast<const uint8_t*>(qs.data_ptr());
  const S* wd = d.data_ptr<S>();
  const S* wm = m.defined() ? m.data_ptr<S>() : nullptr;
  Y* out = y.data_ptr<Y>();
  // Decode only (M < kRows): for more rows the AVX2 kernel, which reuses each weight block for four of them, is
  // faster (measured: 0.82-0.93x with a VNNI kernel at M = 16 and 64).
  at::parallel_for(0, (N + 1) / 2, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = 2 * begin; n < std::min(2 * end, N); n += 2) {
      const bool single = n + 1 == N;  // the last row of an odd N
      for (int64_t m0 = 0; m0 < M; ++m0) {
        if (wm != nullptr) {
          two_rows_vnni<true>(q, wd, wm, a, group, n, single, m0, out, N);
        } else {
          two_rows_vnni<false>(q, wd, wm, a, group, n, single, m0, out, N);
        }
      }
    }
  });
}

void dispatch_vnni(const ActsV& a, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t group,
                   at::Tensor& y, bool half, bool bf16) {
  if (half && bf16) run_vnni<at::Half, at::BFloat16>(a, qs, d, m, group, y);
  if (half && !bf16) run_vnni<at::Half, float>(a, qs, d, m, group, y);
  if (!half && bf16) run_vnni<float, at::BFloat16>(a, qs, d, m, group, y);
  if (!half && !bf16) run_vnni<float, float>(a, qs, d, m, group, y);
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
  at::Tensor y = at::empty({M, N}, x.options());
  const bool half = d.scalar_type() == at::kHalf, bf16 = x.scalar_type() == at::kBFloat16;
  // VNNI: int4 decode. int8 weights are read as fast by AVX2 (memory-bound), and prefill too (see run_vnni).
  if constexpr (Int4) {
    if (precise && M < kRows && K % (2 * kBlock) == 0 && use_vnni()) {
      dispatch_vnni(prepare_acts_vnni(x), qs, d, m, group, y, half, bf16);
      return y;
    }
  }
  const Acts a = prepare_acts(x, precise);
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

// Whether the precise kernels take the AVX512-VNNI path: mode -1 asks, 0 turns it off, 1 on (where supported).
bool vnni(int64_t mode) {
  if (mode == 0) vnni_mode = 0;
  if (mode == 1) vnni_mode = vnni_supported() ? 1 : 0;
  return use_vnni();
}

}  // namespace

TORCH_LIBRARY(forge_cpu, lib) {
  lib.def("int4_mm(Tensor x, Tensor qs, Tensor d, Tensor m, int group, bool precise=True) -> Tensor");
  lib.def("int8_mm(Tensor x, Tensor qs, Tensor d, Tensor? m, int group, bool precise=True) -> Tensor");
  lib.def("vnni(int mode=-1) -> bool", &vnni);
}

TORCH_LIBRARY_IMPL(forge_cpu, CPU, lib) {
  lib.impl("int4_mm", &int4_mm);
  lib.impl("int8_mm", &int8_mm);
}
