// Fused multi-head attention with dropout on the attention probabilities, for CPU training.
//
// Same function as scaled_dot_product_attention(q, k, v, dropout_p=p) / the stock
// TransformerEncoderLayer: O = (keep * softmax(q k^T / sqrt(hd)) / (1 - p)) v. torch's CPU
// flash kernel has no dropout, so with p > 0 it falls back to a math path that materialises
// [B, H, V, V] scores, probabilities and a Bernoulli mask in DRAM. Here each (cell, head)
// slice is processed in query blocks that stay in the core's L2, the dropout mask is a hash
// of (seed, slice, row, column) computed inside the loop (never stored), and the backward
// pass recomputes the probabilities from the saved log-sum-exp and the mask from the seed
// (as FlashAttention does with its Philox counter on GPU).
//
// Layout: qkv [B, V, 3, H, hd] (the fused projection's output, no permute copy);
// out [B, V, H, hd]; lse [B, H, V]; dqkv like qkv.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// the Fortran BLAS sgemm that libtorch_cpu exports (MKL in the x86 wheels)
extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b,
                       const int* ldb, const float* beta, float* c, const int* ldc);

namespace {

// row-major C[M, N] = alpha * op(A) op(B) + beta * C (BLAS is column-major: swap operands)
inline void mm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
               int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  sgemm_(&cb, &ca, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

// register-tiled micro-kernel: C[r][0:16] (+)= sum_k a[r * ars + k * aks] * b[k * bks + 0:16],
// r < R <= 6 (12 accumulators + 2 operand registers: fits AVX2's 16 ymm registers; GCC vector
// extensions, so it also compiles to NEON/SSE elsewhere)
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));

template <int R>
__attribute__((always_inline)) inline void tile16(const float* __restrict a, int64_t ars, int64_t aks,
                                                  const float* __restrict b, int64_t bks, int64_t K,
                                                  float alpha, float* __restrict c, int64_t crs,
                                                  bool accumulate) {
  v8 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = v8{};
  for (int64_t k = 0; k < K; ++k) {
    const v8 b0 = *reinterpret_cast<const v8u*>(b + k * bks);
    const v8 b1 = *reinterpret_cast<const v8u*>(b + k * bks + 8);
    for (int r = 0; r < R; ++r) {
      const float s = a[r * ars + k * aks];
      lo[r] += s * b0;
      hi[r] += s * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    v8u* c0 = reinterpret_cast<v8u*>(c + r * crs);
    v8u* c1 = reinterpret_cast<v8u*>(c + r * crs + 8);
    if (accumulate) {
      *c0 = *c0 + alpha * lo[r];
      *c1 = *c1 + alpha * hi[r];
    } else {
      *c0 = alpha * lo[r];
      *c1 = alpha * hi[r];
    }
  }
}

// C[M][N] (+)= alpha * sum_k A(r, k) B[k][n], N % 16 == 0: A(r, k) = a[r * ars + k * aks]
inline void gemm16(int64_t M, int64_t N, int64_t K, float alpha, const float* a, int64_t ars,
                   int64_t aks, const float* b, int64_t bks, float* c, int64_t crs, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    int64_t r = 0;
    for (; r + 6 <= M; r += 6)
      tile16<6>(a + r * ars, ars, aks, b + n0, bks, K, alpha, c + r * crs + n0, crs, accumulate);
    const float* ar = a + r * ars;
    float* cr = c + r * crs + n0;
    switch (M - r) {
      case 5: tile16<5>(ar, ars, aks, b + n0, bks, K, alpha, cr, crs, accumulate); break;
      case 4: tile16<4>(ar, ars, aks, b + n0, bks, K, alpha, cr, crs, accumulate); break;
      case 3: tile16<3>(ar, ars, aks, b + n0, bks, K, alpha, cr, crs, accumulate); break;
      case 2: tile16<2>(ar, ars, aks, b + n0, bks, K, alpha, cr, crs, accumulate); break;
      case 1: tile16<1>(ar, ars, aks, b + n0, bks, K, alpha, cr, crs, accumulate); break;
      default: break;
    }
  }
}

// two-vector lane shuffle: GCC's __builtin_shuffle (any version), clang's __builtin_shufflevector
#if defined(__clang__)
#define SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int v8i __attribute__((vector_size(32)));
#define SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif

// 8 x 8 transpose in registers (unpack, shuffle, then swap 128-bit halves: the classic AVX
// sequence, written with generic shuffles)
inline void transpose8(v8 r[8]) {
  v8 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = SHUFFLE8(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = SHUFFLE8(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int h = 0; h < 2; ++h) {
      u[i + 2 * h] = SHUFFLE8(t[i + h], t[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * h + 1] = SHUFFLE8(t[i + h], t[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int c = 0; c < 4; ++c) {
    r[c] = SHUFFLE8(u[c], u[c + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[c + 4] = SHUFFLE8(u[c], u[c + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// K^T (or V^T) of one slice: rows of stride ld -> [hd][V] contiguous, for the tiled QK^T
// (hd, V multiples of 16 there); in 8 x 8 register blocks: a scalar copy waited on every load
inline void transpose_to(const float* src, int64_t ld, int64_t V, int64_t hd, float* dst) {
  for (int64_t j = 0; j < V; j += 8)
    for (int64_t c = 0; c < hd; c += 8) {
      v8 r[8];
      for (int i = 0; i < 8; ++i) r[i] = *reinterpret_cast<const v8u*>(src + (j + i) * ld + c);
      transpose8(r);
      for (int i = 0; i < 8; ++i) *reinterpret_cast<v8u*>(dst + (c + i) * V + j) = r[i];
    }
}

// n rows of hd floats at row stride ld <-> contiguous [n][hd]. The GEMMs re-read their B
// operand for every tile; a head's rows of qkv lie 1536 bytes apart (S), which maps them onto
// 8 of L1's 64 sets, so strided they were re-fetched from L2 on every pass
inline void pack_rows(const float* src, int64_t ld, int64_t n, int64_t hd, float* dst) {
  for (int64_t j = 0; j < n; ++j) std::memcpy(dst + j * hd, src + j * ld, hd * sizeof(float));
}

inline void unpack_rows(const float* src, int64_t n, int64_t hd, float* dst, int64_t ld) {
  for (int64_t j = 0; j < n; ++j) std::memcpy(dst + j * ld, src + j * hd, hd * sizeof(float));
}

// body(s, thread_buffers) for s in [0, n), slices handed out one at a time (a static split
// leaves one core idle whenever the other is slowed, which on a shared VM is often)
template <class Init, class Body>
void for_each_slice(int64_t n, Init init, Body body) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    auto buffers = init();
    for (int64_t s = next.fetch_add(1); s < n; s = next.fetch_add(1)) body(s, buffers);
  });
}

inline uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// 32 random bits for column j of a row with key k (murmur3 fmix32 of a per-row Weyl sequence;
// plain 32-bit integer ops, so the column loop vectorises)
__attribute__((always_inline)) inline uint32_t col_bits(uint32_t k, uint32_t j) {
  uint32_t x = k + j * 0x9e3779b9u;
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  return x ^ (x >> 16);
}

inline uint32_t row_key(uint64_t seed, int64_t row) {
  return static_cast<uint32_t>(mix64(seed ^ mix64(static_cast<uint64_t>(row) + 0x632be59bd9b4e019ULL)) >> 32);
}

// exp for x <= 0 (scores minus their row max), ~1 ulp in fp32 over the range that matters;
// branch-free so that the row loops vectorise
__attribute__((always_inline)) inline float exp_neg(float x) {
  x = std::max(x, -87.0f);
  // round to nearest with the 1.5 * 2^23 trick (vectorises without -ffast-math)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &e, sizeof(float));
  return p * s;
}

// one row of the backward pass: P = exp(S - lse) from the recomputed scores in pr, the
// dropout mask from (key, j); on return pr holds the dropped P (for dV) and dpr dS (for dQ, dK).
// thr = 0 keeps everything (no dropout).
void backward_row(float* __restrict pr, float* __restrict dpr, int64_t V, float lse, float D,
                  uint32_t key, uint32_t thr, float inv) {
#pragma omp simd
  for (int32_t j = 0; j < static_cast<int32_t>(V); ++j) {
    const float pj = exp_neg(pr[j] - lse);
    const float kf = col_bits(key, static_cast<uint32_t>(j)) >= thr ? inv : 0.0f;
    const float pd = pj * kf;
    dpr[j] = pd * dpr[j] - pj * D;  // dS = P * (keep * dPd / (1 - p) - D)
    pr[j] = pd;
  }
}

void dropout_row(const float* __restrict a, float* __restrict b, int64_t n, uint32_t key,
                 uint32_t thr, float inv) {
#pragma omp simd
  for (int32_t j = 0; j < static_cast<int32_t>(n); ++j)
    b[j] = col_bits(key, static_cast<uint32_t>(j)) >= thr ? a[j] * inv : 0.0f;
}

// GELU(x) = x Phi(x) and its derivative Phi(x) + x phi(x), Phi = (1 + erf(x / sqrt 2)) / 2,
// with erfc from Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7) whose exp(-x^2 / 2) is also
// the density phi's: one exp and one division per element, branch-free (vectorises)
struct GeluParts {
  float cdf, pdf;
};

__attribute__((always_inline)) inline GeluParts gelu_parts(float x) {
  const float u = std::fabs(x) * 0.70710678118654752f;
  const float t = 1.0f / (1.0f + 0.3275911f * u);
  const float e = exp_neg(-u * u);
  float poly = 1.061405429f;
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  const float half_erfc = 0.5f * poly * t * e;  // erfc(|x| / sqrt 2) / 2 = Phi(-|x|)
  return {x >= 0.0f ? 1.0f - half_erfc : half_erfc, e * 0.39894228040143268f};
}

// y = dropout(GELU(x)) (thr, inv as in dropout_row)
void gelu_dropout_row(const float* __restrict x, float* __restrict y, int64_t n, uint32_t key,
                      uint32_t thr, float inv) {
#pragma omp simd
  for (int32_t j = 0; j < static_cast<int32_t>(n); ++j) {
    const GeluParts gp = gelu_parts(x[j]);
    y[j] = col_bits(key, static_cast<uint32_t>(j)) >= thr ? x[j] * gp.cdf * inv : 0.0f;
  }
}

// dx = keep * g / (1 - p) * GELU'(x)
void gelu_dropout_backward_row(const float* __restrict g, const float* __restrict x,
                               float* __restrict dx, int64_t n, uint32_t key, uint32_t thr, float inv) {
#pragma omp simd
  for (int32_t j = 0; j < static_cast<int32_t>(n); ++j) {
    const GeluParts gp = gelu_parts(x[j]);
    dx[j] = col_bits(key, static_cast<uint32_t>(j)) >= thr ? g[j] * inv * (gp.cdf + x[j] * gp.pdf) : 0.0f;
  }
}

// one row of the forward pass: scores -> exp(score - max) * keep (the 1 / sum and 1 / keep
// scales are applied to the output rows after the GEMM); writes the row's log-sum-exp (of ALL
// probabilities, kept or not) and returns the sum. thr = 0 keeps everything.
float forward_row(float* __restrict row, int64_t V, uint32_t key, uint32_t thr, float* lse) {
  // row max: eight lanes in a vector register (GCC does not vectorise a float max reduction
  // without -ffast-math)
  float mx = row[0];
  int64_t j0 = 0;
  if (V >= 8) {
    v8 m8 = *reinterpret_cast<const v8u*>(row);
    for (j0 = 8; j0 + 8 <= V; j0 += 8) {
      const v8 x = *reinterpret_cast<const v8u*>(row + j0);
      m8 = m8 > x ? m8 : x;
    }
    for (int l = 0; l < 8; ++l) mx = std::max(mx, m8[l]);
  }
  for (; j0 < V; ++j0) mx = std::max(mx, row[j0]);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int32_t j = 0; j < static_cast<int32_t>(V); ++j) {
    const float e = exp_neg(row[j] - mx);
    sum += e;
    row[j] = col_bits(key, static_cast<uint32_t>(j)) >= thr ? e : 0.0f;
  }
  *lse = mx + std::log(sum);
  return sum;
}

// out[i] = a_i . b_i over n rows of length hd (row stride ld)
void rowdots(const float* __restrict a, const float* __restrict b, int64_t ld, int64_t n, int64_t hd,
             float* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int32_t c = 0; c < static_cast<int32_t>(hd); ++c) acc += a[i * ld + c] * b[i * ld + c];
    out[i] = acc;
  }
}

inline uint32_t drop_threshold(double p) {
  double t = std::round(p * 4294967296.0);
  return static_cast<uint32_t>(std::min(4294967295.0, std::max(0.0, t)));
}

// shapes, blocking and dropout constants of one call (p = 0: thr = 0 keeps all, inv = 1)
struct Dims {
  int64_t B, V, H, hd, d, ld;
  int64_t qb;  // query rows per block
  bool tiled;  // head_dim and V multiples of 16: register-tiled GEMMs instead of BLAS calls
  float scale, inv;
  uint32_t thr;
  uint64_t seed;
};

}  // namespace

// keep probability is 1 - thr / 2^32; the kept probabilities are scaled by its inverse
double keep_scale(double p) { return 1.0 / (1.0 - drop_threshold(p) / 4294967296.0); }

namespace {

Dims dims_of(const at::Tensor& qkv, int64_t H, double p, int64_t seed) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.scalar_type() == at::kFloat && qkv.is_contiguous() &&
                  qkv.device().is_cpu(),
              "qkv must be a contiguous float32 CPU tensor [B, V, 3*d]");
  Dims g;
  g.B = qkv.size(0);
  g.V = qkv.size(1);
  TORCH_CHECK(qkv.size(2) % (3 * H) == 0, "3*d must be divisible by 3*n_heads");
  g.H = H;
  g.d = qkv.size(2) / 3;
  g.ld = 3 * g.d;
  g.hd = g.d / H;
  // a block of scores: qb x V floats = 128 KB (two in backward), inside a 512 KB L2
  g.qb = std::max<int64_t>(1, std::min<int64_t>(g.V, (32 * 1024) / g.V));
  g.tiled = g.hd % 16 == 0 && g.V % 16 == 0;
  g.scale = 1.0f / std::sqrt(static_cast<float>(g.hd));
  g.thr = drop_threshold(p);
  g.inv = static_cast<float>(keep_scale(p));
  g.seed = static_cast<uint64_t>(seed);
  return g;
}

// The three GEMM shapes of attention, on the tiled kernel or on BLAS (row-major, any strides).
// C[m, V] = alpha * A[m, hd] B[V, hd]^T; bt is B^T as [hd][V], which the tiled kernel reads
inline void mm_abt(const Dims& g, int64_t m, float alpha, const float* a, int64_t lda,
                   const float* b, int64_t ldb, const float* bt, float* c) {
  if (g.tiled)
    gemm16(m, g.V, g.hd, alpha, a, lda, 1, bt, g.V, c, g.V, false);
  else
    mm(false, true, m, g.V, g.hd, alpha, a, lda, b, ldb, 0.0f, c, g.V);
}

// C[m, hd] = alpha * A[m, V] B[V, hd]
inline void mm_ab(const Dims& g, int64_t m, float alpha, const float* a, const float* b,
                  int64_t ldb, float* c, int64_t ldc) {
  if (g.tiled)
    gemm16(m, g.hd, g.V, alpha, a, g.V, 1, b, ldb, c, ldc, false);
  else
    mm(false, false, m, g.hd, g.V, alpha, a, g.V, b, ldb, 0.0f, c, ldc);
}

// C[V, hd] += alpha * A[m, V]^T B[m, hd]
inline void mm_atb_add(const Dims& g, int64_t m, float alpha, const float* a, const float* b,
                       int64_t ldb, float* c, int64_t ldc) {
  if (g.tiled)
    gemm16(g.V, g.hd, m, alpha, a, 1, g.V, b, ldb, c, ldc, true);
  else
    mm(true, false, g.V, g.hd, m, alpha, a, g.V, b, ldb, 1.0f, c, ldc);
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& qkv, int64_t H, double p, int64_t seed) {
  const Dims g = dims_of(qkv, H, p, seed);
  const int64_t B = g.B, V = g.V, hd = g.hd, d = g.d, ld = g.ld;
  auto out = at::empty({B, V, d}, qkv.options());
  auto lse = at::empty({B, H, V}, qkv.options());
  const float* base = qkv.data_ptr<float>();
  float* o = out.data_ptr<float>();
  float* l = lse.data_ptr<float>();

  struct Buffers {
    std::vector<float> S, W, Kt, Vp;
  };
  for_each_slice(
      B * H,
      [&] {
        return Buffers{std::vector<float>(g.qb * V), std::vector<float>(g.qb),
                       std::vector<float>(g.tiled ? hd * V : 0), std::vector<float>(V * hd)};
      },
      [&](int64_t s, Buffers& buf) {
        float* S = buf.S.data();
        float* W = buf.W.data();
        float* Vp = buf.Vp.data();
        const int64_t b = s / H, h = s % H;
        const float* q = base + b * V * ld + h * hd;
        const float* k = q + d;
        float* os = o + b * V * d + h * hd;
        if (g.tiled) transpose_to(k, ld, V, hd, buf.Kt.data());
        pack_rows(q + 2 * d, ld, V, hd, Vp);
        for (int64_t i0 = 0; i0 < V; i0 += g.qb) {
          const int64_t m = std::min(g.qb, V - i0);
          mm_abt(g, m, g.scale, q + i0 * ld, ld, k, ld, buf.Kt.data(), S);
          for (int64_t r = 0; r < m; ++r) {
            const int64_t row = s * V + i0 + r;
            W[r] = g.inv / forward_row(S + r * V, V, row_key(g.seed, row), g.thr, l + row);
          }
          mm_ab(g, m, 1.0f, S, Vp, hd, os + i0 * d, d);
          for (int64_t r = 0; r < m; ++r) {
            float* orow = os + (i0 + r) * d;
            for (int64_t c = 0; c < hd; ++c) orow[c] *= W[r];
          }
        }
      });
  return {out, lse};
}

at::Tensor backward(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& out,
                    const at::Tensor& lse, int64_t H, double p, int64_t seed) {
  const Dims g = dims_of(qkv, H, p, seed);
  const int64_t B = g.B, V = g.V, hd = g.hd, d = g.d, ld = g.ld;
  TORCH_CHECK(dout.is_contiguous() && out.is_contiguous() && lse.is_contiguous(),
              "dout, out and lse must be contiguous");
  auto dqkv = at::empty_like(qkv);  // every element is written: dq per block, dk and dv per slice
  const float* base = qkv.data_ptr<float>();
  const float* go = dout.data_ptr<float>();
  const float* o = out.data_ptr<float>();
  const float* l = lse.data_ptr<float>();
  float* gbase = dqkv.data_ptr<float>();

  struct Buffers {
    std::vector<float> P, dP, Kt, Vt, D, Kp, dKp, dVp, Qb, dOb;
  };
  for_each_slice(
      B * H,
      [&] {
        const auto f = [](int64_t n) { return std::vector<float>(n); };
        return Buffers{f(g.qb * V), f(g.qb * V), f(g.tiled ? hd * V : 0), f(g.tiled ? hd * V : 0), f(V),
                       f(V * hd), f(V * hd), f(V * hd), f(g.qb * hd), f(g.qb * hd)};
      },
      [&](int64_t s, Buffers& buf) {
        float* P = buf.P.data();
        float* dP = buf.dP.data();
        float* D = buf.D.data();
        float* Kp = buf.Kp.data();
        float* dKp = buf.dKp.data();
        float* dVp = buf.dVp.data();
        float* Qb = buf.Qb.data();
        float* dOb = buf.dOb.data();
        const int64_t b = s / H, h = s % H;
        const int64_t off = b * V * ld + h * hd;
        const float* q = base + off;
        const float* k = q + d;
        const float* v = q + 2 * d;
        float* dq = gbase + off;
        const float* gos = go + b * V * d + h * hd;
        const float* os = o + b * V * d + h * hd;
        if (g.tiled) {
          transpose_to(k, ld, V, hd, buf.Kt.data());
          transpose_to(v, ld, V, hd, buf.Vt.data());
        }
        pack_rows(k, ld, V, hd, Kp);
        std::fill(buf.dKp.begin(), buf.dKp.end(), 0.0f);
        std::fill(buf.dVp.begin(), buf.dVp.end(), 0.0f);
        rowdots(gos, os, d, V, hd, D);  // D_i = rowsum(dP * P)_i = dO_i . O_i
        for (int64_t i0 = 0; i0 < V; i0 += g.qb) {
          const int64_t m = std::min(g.qb, V - i0);
          pack_rows(q + i0 * ld, ld, m, hd, Qb);
          pack_rows(gos + i0 * d, d, m, hd, dOb);
          // S, then P = exp(S - lse) (recomputed), and dPd = dO V^T
          mm_abt(g, m, g.scale, Qb, hd, k, ld, buf.Kt.data(), P);
          mm_abt(g, m, 1.0f, dOb, hd, v, ld, buf.Vt.data(), dP);
          for (int64_t r = 0; r < m; ++r) {
            const int64_t row = s * V + i0 + r;
            backward_row(P + r * V, dP + r * V, V, l[row], D[i0 + r], row_key(g.seed, row), g.thr,
                         g.inv);
          }
          mm_atb_add(g, m, 1.0f, P, dOb, hd, dVp, hd);
          mm_ab(g, m, g.scale, dP, Kp, hd, dq + i0 * ld, ld);
          mm_atb_add(g, m, g.scale, dP, Qb, hd, dKp, hd);
        }
        unpack_rows(dKp, V, hd, dq + d, ld);
        unpack_rows(dVp, V, hd, dq + 2 * d, ld);
      });
  return dqkv;
}

// the keep mask [B, H, V, V] that forward/backward use for this seed (tests, diagnostics)
at::Tensor keep_mask(int64_t B, int64_t H, int64_t V, double p, int64_t seed) {
  auto m = at::empty({B, H, V, V}, at::TensorOptions().dtype(at::kBool));
  bool* mp = m.data_ptr<bool>();
  const uint32_t thr = drop_threshold(p);
  const uint64_t useed = static_cast<uint64_t>(seed);
  at::parallel_for(0, B * H * V, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t key = row_key(useed, r);
      for (int64_t j = 0; j < V; ++j) mp[r * V + j] = col_bits(key, static_cast<uint32_t>(j)) >= thr;
    }
  });
  return m;
}

namespace {

// The elementwise ops' mask layout: element i of the flattened tensor is column i % 1024 of
// row i / 1024. f(offset, length, key) for each row, rows split across threads.
template <class F>
void for_each_mask_row(int64_t n, int64_t seed, F f) {
  constexpr int64_t W = 1024;
  const uint64_t useed = static_cast<uint64_t>(seed);
  at::parallel_for(0, (n + W - 1) / W, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) f(r * W, std::min(W, n - r * W), row_key(useed, r));
  });
}

at::Tensor checked_contiguous(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), name, " must be a float32 CPU tensor");
  return x.contiguous();
}

// y = row(x) over the mask rows of one input (Row: a *_row function above)
template <class Row>
at::Tensor map_mask_rows(const at::Tensor& x, double p, int64_t seed, Row row) {
  const auto xc = checked_contiguous(x, "x");
  auto y = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint32_t thr = drop_threshold(p);
  const float inv = static_cast<float>(keep_scale(p));
  for_each_mask_row(xc.numel(), seed, [&](int64_t i, int64_t len, uint32_t key) {
    row(xp + i, yp + i, len, key, thr, inv);
  });
  return y;
}

}  // namespace

// elementwise dropout y = x * keep / (1 - p) with the same counter-based mask; the backward
// pass calls it again with the same seed on the gradient, so no mask is stored
at::Tensor dropout(const at::Tensor& x, double p, int64_t seed) {
  return map_mask_rows(x, p, seed, dropout_row);
}

// y = dropout(GELU(x)) in one pass, the mask of dropout(GELU(x), p, seed) (the FFN's
// activation and its dropout: the stock layer's two passes forward and two backward)
at::Tensor gelu_dropout(const at::Tensor& x, double p, int64_t seed) {
  return map_mask_rows(x, p, seed, gelu_dropout_row);
}

at::Tensor gelu_dropout_backward(const at::Tensor& g, const at::Tensor& x, double p, int64_t seed) {
  const auto gc = checked_contiguous(g, "g");
  const auto xc = checked_contiguous(x, "x");
  TORCH_CHECK(gc.sizes() == xc.sizes(), "g and x must have the same shape");
  auto dx = at::empty_like(xc);
  const float* gp = gc.data_ptr<float>();
  const float* xp = xc.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  const uint32_t thr = drop_threshold(p);
  const float inv = static_cast<float>(keep_scale(p));
  for_each_mask_row(xc.numel(), seed, [&](int64_t i, int64_t len, uint32_t key) {
    gelu_dropout_backward_row(gp + i, xp + i, dp + i, len, key, thr, inv);
  });
  return dx;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("dropout", &dropout, "elementwise dropout with the counter-based mask of seed");
  mod.def("gelu_dropout", &gelu_dropout, "dropout(GELU(x)) with the mask of dropout");
  mod.def("gelu_dropout_backward", &gelu_dropout_backward, "gradient of gelu_dropout");
  mod.def("forward", &forward, "fused dropout attention forward -> (out, lse)");
  mod.def("backward", &backward, "fused dropout attention backward -> dqkv");
  mod.def("keep_mask", &keep_mask, "the keep mask for (B, H, V, p, seed)");
  mod.def("keep_scale", &keep_scale, "1 / keep probability (p quantised to 2^-32)");
}
