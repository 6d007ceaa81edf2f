// Forge's CUDA quantized GEMM for batches of up to 64 rows of bf16 x (the "cuda_mma" path of quant_linear):
// y (M, N) = x (M, K) @ w^T, w (N, K) int4 in GGUF's blocks of 32 (INT4 1) or int8 per output channel (INT4 0).
// Compiled at run time by NVRTC (torch.cuda._compile_kernel); the macros below are the launch config.
//
// The product is computed transposed, y^T = w @ x^T, with mma.sync.m16n8k16 (bf16 in, fp32 accumulators): the
// weight is the MMA's A operand and goes from global memory straight into registers, each value read by exactly
// one thread once (no shared memory, no reuse needed: one CTA covers all M <= 64 rows of x). x is the B operand,
// staged through shared memory by cp.async in STAGES stages, read with 128-bit loads.
//
// Each thread owns the same four k slots {2t, 2t+1, 2t+8, 2t+9} of A and B (t = lane % 4), so which physical
// column of K a slot stands for may differ between the four threads t, as long as A and B agree. Thread t takes
// the 16 bytes of weight row n at span t of a super-step (int4: GGUF block t of four, 32 columns; int8: 16
// columns), so every weight load is one 128-bit load, and its B values are 8 contiguous bytes of x per MMA.
//
// int4: a block's byte b holds column b (low nibble) and b + 16 (high). Word i of the block's 16 bytes, bytes
// permuted to [b0 b2 b1 b3], gives with one lop3 per pair the bf16 pairs 128 + code for columns (4i, 4i+1),
// (16+4i, +1), (4i+2, +3) and (16+4i+2, +3); then (v - 128) * scale + minimum in bf16 (two fma.rn.bf16x2, the
// same roundings as the Triton kernels). int8: each byte made the fp32 2^23 + 128 + q, less 2^23 + 128 (exact),
// packed to bf16 pairs; the per-channel scale multiplies the fp32 accumulator at the end.
//
// Macros: INT4, MT (n8 tiles of x rows: 2, 4 or 8), AT (16-row A tiles a warp: 1 or 2), WARPS, STAGES,
// PD (super-steps of weights loaded ahead), WGMMA (the Hopper form below, sm_90a), SCALE_KIND (0 fp32, 1 fp16, 2 bf16 scales and minimums).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#if INT4
#define SPAN 32
#define ROW_PAD 32   // x rows at 288 bytes (32 mod 128) with the chunk swizzle: conflict-free 128-bit loads
#else
#define SPAN 16
#define ROW_PAD 16   // 144 bytes (16 mod 128)
#endif
#define SS (4 * SPAN)                 // columns of K a super-step: the four threads t of a row
#define MROWS (MT * 8)                // rows of x staged
#define XS (SS * 2 + ROW_PAD)         // bytes a staged x row
#define STAGE_BYTES (MROWS * XS)
#define CHUNKS (SS * 2 / 16)          // 16-byte chunks a staged x row
#define ROWS_CTA (WARPS * 16 * AT)

#if SCALE_KIND == 0
typedef float scale_t;
__device__ __forceinline__ float to_f32(float v) { return v; }
#elif SCALE_KIND == 1
typedef u16 scale_t;
__device__ __forceinline__ float to_f32(u16 v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
  return f;
}
#else
typedef u16 scale_t;
__device__ __forceinline__ float to_f32(u16 v) { return __uint_as_float(((u32)v) << 16); }
#endif

__device__ __forceinline__ u32 smem_u32(const void* p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

__device__ __forceinline__ void ldg128(u32 (&r)[4], const void* p) {
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "l"(p));
}

__device__ __forceinline__ void lds128(u32 (&r)[4], u32 addr) {
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void mma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
  u32 d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

__device__ __forceinline__ u32 lop3_and_or(u32 a, u32 b, u32 c) {  // (a & b) | c
  u32 d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

__device__ __forceinline__ u16 to_bf16(float v) {
  u16 d;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(d) : "f"(v));
  return d;
}

// int4: the four bf16 pairs (128 + code) of word w: (4i, 4i+1), (16+4i, +1), (4i+2, +3), (16+4i+2, +3).
__device__ __forceinline__ void nibble_pairs(u32 w, u32 (&e)[4]) {
  const u32 p = prmt(w, 0u, 0x3120u);  // bytes [b0 b2 b1 b3]
  e[0] = lop3_and_or(p, 0x000F000Fu, 0x43004300u);
  e[1] = lop3_and_or(p >> 4, 0x000F000Fu, 0x43004300u);
  e[2] = lop3_and_or(p >> 8, 0x000F000Fu, 0x43004300u);
  e[3] = lop3_and_or(p >> 12, 0x000F000Fu, 0x43004300u);
}

// int8: word w's four signed bytes as bf16 pairs (c0, c1) and (c2, c3), exact.
__device__ __forceinline__ void byte_pairs(u32 w, u32& lo, u32& hi) {
  const u32 u = w ^ 0x80808080u;
  const float k = 8388736.0f;  // 2^23 + 128
  const float f0 = __uint_as_float(prmt(u, 0x4B000000u, 0x7650u)) - k;
  const float f1 = __uint_as_float(prmt(u, 0x4B000000u, 0x7651u)) - k;
  const float f2 = __uint_as_float(prmt(u, 0x4B000000u, 0x7652u)) - k;
  const float f3 = __uint_as_float(prmt(u, 0x4B000000u, 0x7653u)) - k;
  lo = pack2(f0, f1);
  hi = pack2(f2, f3);
}

__device__ __forceinline__ int swz(int chunk) {
#if INT4
  return chunk ^ ((chunk >> 3) & 1);
#else
  return chunk;
#endif
}

// Both forms' kernel: its parameters (Python passes them in this order) and first lines.
#define KERNEL_PARAMS                                                                                          \
  const unsigned char *__restrict__ q, const scale_t *__restrict__ sc, const scale_t *__restrict__ mn,          \
      const u16 *__restrict__ bias, const u16 *__restrict__ x, u16 *__restrict__ y, float *__restrict__ ws,     \
      int M, int N, int K, int stride_xm, int stride_sn, int stride_sg, int blocks_per_group, int k_split,      \
      int has_bias, int split
#define KERNEL_SETUP                                                                                           \
  extern __shared__ __align__(128) unsigned char smem[];                                                       \
  const u32 sbase = smem_u32(smem);                                                                            \
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;                                                  \
  const int g = lane >> 2, t = lane & 3;

// One 16-row tile's accumulators (rows n0 + g and n0 + g + 8 of y^T, columns nt*8 + 2t (+1): y[m][n]) to y, or
// with a K split to its fp32 slice of the workspace; int8's per-channel scale applied here.
__device__ __forceinline__ void store_tile(const float (&acc)[MT][4], int n0, int g, int t, const scale_t* sc,
                                           const u16* bias, u16* y, float* ws, int M, int N, int stride_sn,
                                           int has_bias, int split) {
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int n = n0 + g + 8 * h;
    if (n >= N) continue;
#if INT4
    const float sn = 1.f;
#else
    const float sn = to_f32(sc[(long)n * stride_sn]);
#endif
    const float bn = (has_bias && !split) ? __uint_as_float(((u32)bias[n]) << 16) : 0.f;
#pragma unroll
    for (int nt = 0; nt < MT; nt++)
#pragma unroll
      for (int c = 0; c < 2; c++) {
        const int m = nt * 8 + 2 * t + c;
        if (m >= M) continue;
        const float v = acc[nt][2 * h + c] * sn;
        if (split)
          ws[((long)blockIdx.y * M + m) * N + n] = v;
        else
          y[(long)m * N + n] = to_bf16(v + bn);
      }
  }
}

#if !WGMMA
// One super-step of a warp: its weights w (rows g and g + 8 of each A tile, 16 bytes each) against x's stage at
// shared address xs.
__device__ __forceinline__ void compute(float (&acc)[AT][MT][4], const u32 (&w)[AT][2][4],
#if INT4
                                        const u32 (&s2)[AT][2], const u32 (&z2)[AT][2],
#endif
                                        u32 xs, int g, int t) {
#if INT4
#pragma unroll
  for (int hi = 0; hi < 2; hi++)      // low nibbles (columns 0-15 of the block), then high (16-31)
#pragma unroll
    for (int ip = 0; ip < 2; ip++) {  // words 2ip and 2ip+1
      u32 b[MT][4];
#pragma unroll
      for (int nt = 0; nt < MT; nt++) lds128(b[nt], xs + (nt * 8 + g) * XS + swz(4 * t + ip + 2 * hi) * 16);
#pragma unroll
      for (int ii = 0; ii < 2; ii++) {
        const int i = 2 * ip + ii;
#pragma unroll
        for (int a = 0; a < AT; a++) {
          u32 e0[4], e1[4];
          nibble_pairs(w[a][0][i], e0);
          nibble_pairs(w[a][1][i], e1);
          const u32 one = 0x3F803F80u, m128 = 0xC300C300u;  // bf16 pairs 1.0 and -128.0
          const u32 a0 = fma2(fma2(e0[hi], one, m128), s2[a][0], z2[a][0]);
          const u32 a1 = fma2(fma2(e1[hi], one, m128), s2[a][1], z2[a][1]);
          const u32 a2 = fma2(fma2(e0[2 + hi], one, m128), s2[a][0], z2[a][0]);
          const u32 a3 = fma2(fma2(e1[2 + hi], one, m128), s2[a][1], z2[a][1]);
#pragma unroll
          for (int nt = 0; nt < MT; nt++) mma(acc[a][nt], a0, a1, a2, a3, b[nt][2 * ii], b[nt][2 * ii + 1]);
        }
      }
    }
#else
#pragma unroll
  for (int ip = 0; ip < 2; ip++) {  // words 2ip and 2ip+1: columns 8ip .. 8ip+7 of the span
    u32 b[MT][4];
#pragma unroll
    for (int nt = 0; nt < MT; nt++) lds128(b[nt], xs + (nt * 8 + g) * XS + swz(2 * t + ip) * 16);
#pragma unroll
    for (int ii = 0; ii < 2; ii++) {
      const int i = 2 * ip + ii;
#pragma unroll
      for (int a = 0; a < AT; a++) {
        u32 a0, a1, a2, a3;
        byte_pairs(w[a][0][i], a0, a2);
        byte_pairs(w[a][1][i], a1, a3);
#pragma unroll
        for (int nt = 0; nt < MT; nt++) mma(acc[a][nt], a0, a1, a2, a3, b[nt][2 * ii], b[nt][2 * ii + 1]);
      }
    }
  }
#endif
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) forge_quant_mma(KERNEL_PARAMS) {
  KERNEL_SETUP
  const int n_warp = blockIdx.x * ROWS_CTA + warp * 16 * AT;
  const int k_lo = blockIdx.y * k_split;
  const int k_hi = min(K, k_lo + k_split);
  const int nss = (k_hi - k_lo) / SS;

#if INT4
  const long row_bytes = K / 2;
  const unsigned char* wp[AT][2];
  long srow[AT][2];
#pragma unroll
  for (int a = 0; a < AT; a++)
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int r = min(n_warp + 16 * a + g + 8 * h, N - 1);
      wp[a][h] = q + (long)r * row_bytes + k_lo / 2 + 16 * t;
      srow[a][h] = (long)r * stride_sn;
    }
#else
  const long row_bytes = K;
  const unsigned char* wp[AT][2];
#pragma unroll
  for (int a = 0; a < AT; a++)
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int r = min(n_warp + 16 * a + g + 8 * h, N - 1);
      wp[a][h] = q + (long)r * row_bytes + k_lo + 16 * t;
    }
#endif

  float acc[AT][MT][4];
#pragma unroll
  for (int a = 0; a < AT; a++)
#pragma unroll
    for (int j = 0; j < MT; j++)
#pragma unroll
      for (int c = 0; c < 4; c++) acc[a][j][c] = 0.f;

  // x's super-step j into stage s: MROWS rows of SS columns (rows past M repeat the last one).
  auto load_x = [&](int j, int s) {
    const int k0 = k_lo + j * SS;
    const u32 base = sbase + s * STAGE_BYTES;
    for (int c = threadIdx.x; c < MROWS * CHUNKS; c += WARPS * 32) {
      const int m = c / CHUNKS, ch = c % CHUNKS;
      const u16* src = x + (long)min(m, M - 1) * stride_xm + k0 + ch * 8;
      cp_async16(base + m * XS + swz(ch) * 16, src);
    }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (s < nss) load_x(s, s);
    cp_commit();
  }

  // weights PD super-steps ahead, in a ring of registers indexed at compile time (and int4's scales and minimums)
  u32 wb[PD][AT][2][4];
#if INT4
  scale_t sb[PD][AT][2], zb[PD][AT][2];
#endif
#define LOAD_W(P, J)                                                                       \
  _Pragma("unroll") for (int a = 0; a < AT; a++) _Pragma("unroll") for (int h = 0; h < 2; h++) { \
    ldg128(wb[P][a][h], wp[a][h] + (long)(J) * 64);                                        \
    LOAD_S(P, J)                                                                           \
  }
#if INT4
#define LOAD_S(P, J)                                                                       \
  {                                                                                        \
    const long grp = ((k_lo + (J) * SS) / 32 + t) / blocks_per_group;                      \
    sb[P][a][h] = sc[srow[a][h] + grp * stride_sg];                                        \
    zb[P][a][h] = mn[srow[a][h] + grp * stride_sg];                                        \
  }
#else
#define LOAD_S(P, J)
#endif
#pragma unroll
  for (int p = 0; p < PD; p++)
    if (p < nss) { LOAD_W(p, p) }

  for (int j0 = 0; j0 < nss; j0 += PD) {
#pragma unroll
    for (int p = 0; p < PD; p++) {
      const int j = j0 + p;
      if (j >= nss) break;
      cp_wait<STAGES - 2>();
      __syncthreads();
      {
        const int jn = j + STAGES - 1;
        if (jn < nss) load_x(jn, jn % STAGES);
        cp_commit();
      }
      u32 w[AT][2][4];
#pragma unroll
      for (int a = 0; a < AT; a++)
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
          for (int c = 0; c < 4; c++) w[a][h][c] = wb[p][a][h][c];
#if INT4
      u32 s2[AT][2], z2[AT][2];
#pragma unroll
      for (int a = 0; a < AT; a++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
          const float s = to_f32(sb[p][a][h]), z = to_f32(zb[p][a][h]);
          s2[a][h] = pack2(s, s);
          z2[a][h] = pack2(z, z);
        }
#endif
      if (j + PD < nss) { LOAD_W(p, j + PD) }
      const u32 xs = sbase + (j % STAGES) * STAGE_BYTES;
      #if INT4
      compute(acc, w, s2, z2, xs, g, t);
#else
      compute(acc, w, xs, g, t);
#endif
    }
  }
  cp_wait<0>();

#pragma unroll
  for (int a = 0; a < AT; a++)
    store_tile(acc[a], n_warp + 16 * a, g, t, sc, bias, y, ws, M, N, stride_sn, has_bias, split);
}
#else  // WGMMA
// ---------------------------------------------------------------------------------------------------------------
// The Hopper form (WGMMA 1, sm_90a): wgmma.mma_async with the weight as the register A operand and x as the
// shared-memory B operand, read by the tensor cores through a descriptor (no ld.shared, no B registers). A warpgroup
// (4 warps) takes 64 rows of the weight, each warp its 16 rows in mma.sync's A layout, so the dequantization above is
// unchanged. wgmma reads B's k columns in order, so x is staged with the threads' k permutation applied: each 4-byte
// pair of x columns goes by cp.async to the slot its owner thread's A registers hold, in the no-swizzle K-major
// layout of 8x16-byte core matrices (LBO: the next 8 columns of K; SBO: the next 8 rows of x).
#undef ROWS_CTA
#define ROWS_CTA (WARPS * 16)  // one A tile a warp
#define LBO (MROWS * 16)
#define SLICE (2 * LBO)
#define WG_STAGE (SS / 16 * SLICE)
#define PAIRS (SS / 2)

__device__ __forceinline__ void cp_async4(u32 dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ u64 desc(u32 addr) {  // no swizzle; LBO and SBO in 16-byte units
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(LBO >> 4) << 16) | ((u64)(128 >> 4) << 32);
}

#if MT == 8
#define WG_N 64
#elif MT == 4
#define WG_N 32
#else
#define WG_N 16
#endif

__device__ __forceinline__ void wgmma(float (&d)[MT][4], u32 a0, u32 a1, u32 a2, u32 a3, u64 db) {
#if MT == 8
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,"
      "%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, 1, 1, 1, 0;"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),
        "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]),
        "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]),
        "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(db));
#elif MT == 4
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, 1, 1, 1, 0;"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),
        "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]),
        "+f"(d[3][2]), "+f"(d[3][3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(db));
#else
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12, 1, 1, 1, 0;"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),
        "+f"(d[1][3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(db));
#endif
}

__device__ __forceinline__ void keep(float (&d)[MT][4]) {  // the accumulators stay put around async wgmma
#pragma unroll
  for (int j = 0; j < MT; j++)
#pragma unroll
    for (int c = 0; c < 4; c++) asm volatile("" : "+f"(d[j][c])::"memory");
}

#define NSLICE (SS / 16)
#define PART_STRIDE (MROWS + 1)  // fp32 partials a weight row, padded: the reduction's reads miss no bank
#ifndef CLUSTER
#define CLUSTER 1
#endif
#if CLUSTER > 1
#define CLUSTER_DIMS __cluster_dims__(1, CLUSTER, 1)
#else
#define CLUSTER_DIMS
#endif

extern "C" __global__ void __launch_bounds__(WARPS * 32) CLUSTER_DIMS forge_quant_mma(KERNEL_PARAMS) {
  KERNEL_SETUP
  const int n_warp = blockIdx.x * (WARPS * 16) + warp * 16;  // warp w of a warpgroup: its rows 16w .. 16w+15
  const int k_lo = blockIdx.y * k_split;
  const int k_hi = min(K, k_lo + k_split);
  const int nss = (k_hi - k_lo) / SS;

  const unsigned char* wp[2];
#if INT4
  long srow[2];
#endif
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int r = min(n_warp + g + 8 * h, N - 1);
#if INT4
    wp[h] = q + (long)r * (K / 2) + k_lo / 2 + 16 * t;
    srow[h] = (long)r * stride_sn;
#else
    wp[h] = q + (long)r * K + k_lo + 16 * t;
#endif
  }

  float acc[MT][4];
#pragma unroll
  for (int j = 0; j < MT; j++)
#pragma unroll
    for (int c = 0; c < 4; c++) acc[j][c] = 0.f;

  // x's super-step j into stage s, each 4-byte pair of columns to its owner's slot. A thread copies the SPAN / 2
  // pairs of one row m and one owner t': lanes are (m % 8, t'), so a warp's 32 copies land in 32 banks.
  auto load_x = [&](int j, int s) {
    const int k0 = k_lo + j * SS;
    const u32 base = sbase + s * WG_STAGE;
    for (int idx = threadIdx.x; idx < MROWS * 4; idx += WARPS * 32) {
      const int owner = idx & 3, m = ((idx >> 5) << 3) | ((idx >> 2) & 7);
      const u16* src = x + (long)min(m, M - 1) * stride_xm + k0 + owner * SPAN;
      const u32 row = base + (m / 8) * 128 + (m % 8) * 16 + 4 * owner;
#pragma unroll
      for (int r = 0; r < SPAN; r += 2) {
#if INT4
        const int w = r % 16, slice = (r / 16) * 4 + w / 4;
#else
        const int w = r, slice = w / 4;
#endif
        cp_async4(row + slice * SLICE + ((w % 4) / 2) * LBO, src + r);
      }
    }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (s < nss) load_x(s, s);
    cp_commit();
  }

  // Weights in a ring of two super-steps (PD 2: loaded two ahead, super-step j + 1 dequantized while j's wgmma
  // run; PD 1: one buffer, dequantized before its wgmma).
  u32 wb[2][2][4];
  scale_t sb[2][2], zb[2][2];
  auto load_w = [&](u32 (&wr)[2][4], scale_t (&sr)[2], scale_t (&zr)[2], int j) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
      ldg128(wr[h], wp[h] + (long)j * 64);
#if INT4
      const long grp = ((k_lo + j * SS) / 32 + t) / blocks_per_group;
      sr[h] = sc[srow[h] + grp * stride_sg];
      zr[h] = mn[srow[h] + grp * stride_sg];
#endif
    }
  };
  auto dequant = [&](const u32 (&w)[2][4], const scale_t (&sr)[2], const scale_t (&zr)[2], u32 (&a)[NSLICE][4]) {
#if INT4
    u32 s2[2], z2[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const float sv = to_f32(sr[h]), zv = to_f32(zr[h]);
      s2[h] = pack2(sv, sv);
      z2[h] = pack2(zv, zv);
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
      u32 e0[4], e1[4];
      nibble_pairs(w[0][i], e0);
      nibble_pairs(w[1][i], e1);
      const u32 one = 0x3F803F80u, m128 = 0xC300C300u;
#pragma unroll
      for (int hi = 0; hi < 2; hi++) {
        u32* r = a[hi * 4 + i];
        r[0] = fma2(fma2(e0[hi], one, m128), s2[0], z2[0]);
        r[1] = fma2(fma2(e1[hi], one, m128), s2[1], z2[1]);
        r[2] = fma2(fma2(e0[2 + hi], one, m128), s2[0], z2[0]);
        r[3] = fma2(fma2(e1[2 + hi], one, m128), s2[1], z2[1]);
      }
    }
#else
#pragma unroll
    for (int i = 0; i < 4; i++) {
      byte_pairs(w[0][i], a[i][0], a[i][2]);
      byte_pairs(w[1][i], a[i][1], a[i][3]);
    }
#endif
  };
  // x's stage j ready (cp.async done, made visible to the async proxy), the stage STAGES - 1 ahead requested
  auto next_stage = [&](int j) {
    cp_wait<STAGES - 2>();
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    const int jn = j + STAGES - 1;
    if (jn < nss) load_x(jn, jn % STAGES);
    cp_commit();
  };
  auto issue = [&](int j, const u32 (&a)[NSLICE][4]) {
    const u32 xs = sbase + (j % STAGES) * WG_STAGE;
    keep(acc);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int s = 0; s < NSLICE; s++) wgmma(acc, a[s][0], a[s][1], a[s][2], a[s][3], desc(xs + s * SLICE));
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  };
  auto retire = [&](u32 (&a)[NSLICE][4]) {  // A's registers held until the wgmma that reads them is done
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#pragma unroll
    for (int s = 0; s < NSLICE; s++)
      asm volatile("" : "+r"(a[s][0]), "+r"(a[s][1]), "+r"(a[s][2]), "+r"(a[s][3])::"memory");
    keep(acc);
  };
#if PD == 1
  u32 a[NSLICE][4];
  if (nss > 0) load_w(wb[0], sb[0], zb[0], 0);
  for (int j = 0; j < nss; j++) {
    next_stage(j);
    dequant(wb[0], sb[0], zb[0], a);
    if (j + 1 < nss) load_w(wb[0], sb[0], zb[0], j + 1);
    issue(j, a);
    retire(a);
  }
#else
  u32 a[2][NSLICE][4];
  if (nss > 0) load_w(wb[0], sb[0], zb[0], 0);
  if (nss > 1) load_w(wb[1], sb[1], zb[1], 1);
  if (nss > 0) dequant(wb[0], sb[0], zb[0], a[0]);
  if (nss > 2) load_w(wb[0], sb[0], zb[0], 2);
  for (int j0 = 0; j0 < nss; j0 += 2) {
#pragma unroll
    for (int p = 0; p < 2; p++) {  // the ring's slot a compile-time index
      const int j = j0 + p;
      if (j >= nss) break;
      next_stage(j);
      issue(j, a[p]);
      if (j + 1 < nss) {
        dequant(wb[1 - p], sb[1 - p], zb[1 - p], a[1 - p]);
        if (j + 3 < nss) load_w(wb[1 - p], sb[1 - p], zb[1 - p], j + 3);
      }
      retire(a[p]);
    }
  }
#endif
  cp_wait<0>();
#if CLUSTER > 1
  // The K split's CTAs are one cluster: each puts its fp32 partial in its shared memory, and CTA rank r sums rows
  // [r, r + 1) * ROWS_CTA / CLUSTER of all of them through distributed shared memory, then writes y.
  __syncthreads();  // every warpgroup's wgmma done: the stages are free
  float* part = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int h = 0; h < 2; h++)
#pragma unroll
    for (int nt = 0; nt < MT; nt++)
#pragma unroll
      for (int c = 0; c < 2; c++) part[(warp * 16 + g + 8 * h) * PART_STRIDE + nt * 8 + 2 * t + c] = acc[nt][2 * h + c];
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
  u32 rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  const u32 part_addr = smem_u32(part);
  constexpr int RPC = ROWS_CTA / CLUSTER;
  for (int idx = threadIdx.x; idx < RPC * MROWS; idx += WARPS * 32) {
    const int row = rank * RPC + idx % RPC, m = idx / RPC;
    const int n = blockIdx.x * ROWS_CTA + row;
    const u32 local = part_addr + (row * PART_STRIDE + m) * 4;
    float v = 0.f;
#pragma unroll
    for (int r = 0; r < CLUSTER; r++) {
      u32 remote;
      float pv;
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(r));
      asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(pv) : "r"(remote) : "memory");
      v += pv;
    }
    if (n < N && m < M) {
#if !INT4
      v *= to_f32(sc[(long)n * stride_sn]);
#endif
      if (has_bias) v += __uint_as_float(((u32)bias[n]) << 16);
      y[(long)m * N + n] = to_bf16(v);
    }
  }
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
  store_tile(acc, n_warp, g, t, sc, bias, y, ws, M, N, stride_sn, has_bias, split);
#endif
}
#endif  // WGMMA
