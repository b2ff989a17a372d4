// CPU kernels, built and loaded by kernels/native.py: the grouped SwiGLU expert FFN (moeray_expert_ffn),
// a whole MoE block in one call (moeray_fused_moe), decode attention over the paged KV cache
// (moeray_decode_attention) and the float32 lm_head for a few rows (moeray_logits). kernels/moe.py,
// kernels/attention.py and models/model.py choose them.
//
// A group is one expert e and a range of sorted rows; sorted row j is row rows[j] of x (row j if rows
// is null). For each row of each group:
//   act[j] = silu(w13[e, :I] @ x) * (w13[e, I:] @ x)    [I]
//   out[j] = w2[e] @ act[j]                              [H]
// with w13 [E, 2I, H] and w2 [E, H, I] as checkpoints store them ([out, in], row-major); GPT-OSS's
// experts add biases to both projections and clamp the activation (`Extras`).
//
// Why not torch's matmuls: with a few rows per expert, MKL (F.linear, F.grouped_mm) spends its time
// packing the weight or reading it at a fraction of the memory bandwidth. Here (`run_small`) every
// block of weight rows is read from memory once and kept in L1 while all of its expert's rows are
// multiplied by it, as dot products along the weight rows; both phases are split over the threads by
// (group, block of weight rows). Groups with many rows (`panel_rows` and more; bf16 only where the
// build has AVX512-BF16) are GEMMs of our own instead (`run_panels`): MKL's sgemm reaches ~65% of the
// FMA peak on AMD Zen 2, these tiles 80-90%; on AMD Zen 5 MKL runs 256-bit code, these tiles 512-bit.
//
// Numerics: in `run_small` every output element is one dot product, accumulated in 8 float32 lanes in
// index order (a fused multiply-add per element), the lanes summed pairwise, then any tail; in
// `run_panels` one chain of fused multiply-adds over the index in order. How many rows an expert has
// (on either side of `panel_rows`), or which thread takes which block, never changes a result: a row
// gets the same bits alone or in any batch of its side. bf16 (dtype 1) in `run_small` (but see
// `dot_pairs` for AVX512-BF16 builds): weights
// widen exactly to float32 (a bf16 is the top half of one), 16 at a time, as the even elements (<< 16)
// and the odd ones (& 0xffff0000): no shuffles. The vectors they multiply are stored the same way,
// deinterleaved (see `position`). In `run_panels`, bf16 pairs on vdpbf16ps (see `panel_dots`). Matmul
// outputs, the activation and its product are rounded to bf16 where transformers rounds them (nearest even).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t bf16;

constexpr int64_t BLOCK = 32;        // weight rows per work item
constexpr int64_t ROWS_PER_TILE = 3;  // rows multiplied together: 3 x 4 accumulators + 4 weight vectors = 16 registers

inline v8 load8(const float* p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }
inline v8 splat8(float f) { return v8{f, f, f, f, f, f, f, f}; }  // (v8{} + f would add 0.0f first: -0 is not +0)
// a * b + c rounded once. Every multiply-add here is written as one (built with -ffp-contract=off, so
// the compiler fuses nothing else): the bits do not depend on the compiler's choices.
inline v8 fma8(v8 a, v8 b, v8 c) {
#if defined(__FMA__)
  return reinterpret_cast<v8>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b), reinterpret_cast<__m256>(c)));
#else
  v8 r;
  for (int i = 0; i < 8; ++i) r[i] = std::fma(a[i], b[i], c[i]);
  return r;
#endif
}
// Panels (`run_panels`, `moeray_logits`) hold PW rows of x: one vector of the widest float32 FMA the
// build has, 16 lanes on AVX-512 (twice the FMA rate of 8 where the cores run 512-bit vectors whole, as
// AMD Zen 5 does), else 8. Each output is one chain of fused multiply-adds over k whatever the width, so
// the width changes speed, never bits.
// bf16 groups are GEMMs too (on vdpbf16ps) where the build has AVX512-BF16; elsewhere dot products.
#if defined(__AVX512BF16__)
constexpr bool BF16_PANELS = true;
#else
constexpr bool BF16_PANELS = false;
#endif
#if defined(__AVX512F__)
constexpr int PW = 16;
#else
constexpr int PW = 8;
#endif
template <int W> struct float_vector { typedef float type __attribute__((vector_size(4 * W))); };
template <int W> using vec = typename float_vector<W>::type;
template <int W> inline vec<W> loadv(const float* p) { vec<W> v; std::memcpy(&v, p, sizeof v); return v; }
template <int W> inline vec<W> splat(float f) {  // (vec<W>{} + f would add 0.0f first: -0 is not +0)
#if defined(__AVX512F__)
  if constexpr (W == 16) return vec<W>(_mm512_set1_ps(f));
#endif
  if constexpr (W == 8) return splat8(f);
  vec<W> v;
  for (int i = 0; i < W; ++i) v[i] = f;
  return v;
}
template <int W> inline vec<W> fmav(vec<W> a, vec<W> b, vec<W> c) {
#if defined(__AVX512F__)
  if constexpr (W == 16) return vec<W>(_mm512_fmadd_ps(__m512(a), __m512(b), __m512(c)));
#endif
  if constexpr (W == 8) return fma8(a, b, c);
  vec<W> r;
  for (int i = 0; i < W; ++i) r[i] = std::fma(a[i], b[i], c[i]);
  return r;
}

inline float widen(bf16 h) { uint32_t w = uint32_t(h) << 16; float f; std::memcpy(&f, &w, 4); return f; }
inline bf16 to_bf16(float f) {
  uint32_t w; std::memcpy(&w, &f, 4);
  if ((w & 0x7fffffffu) > 0x7f800000u) return bf16((w >> 16) | 0x40);  // NaN stays a (quiet) NaN
  return bf16((w + 0x7fffu + ((w >> 16) & 1u)) >> 16);
}
inline float round_bf16(float f) { return widen(to_bf16(f)); }
template <int W>  // round_bf16 of each lane
inline vec<W> round_bf16v(vec<W> f) {
  typedef uint32_t U __attribute__((vector_size(4 * W)));
  U w;
  std::memcpy(&w, &f, sizeof w);
  const U nearest = (w + 0x7fffu + ((w >> 16) & 1u)) & 0xffff0000u, quiet = (w & 0xffff0000u) | 0x400000u;
  const U r = (w & 0x7fffffffu) > 0x7f800000u ? quiet : nearest;
  std::memcpy(&f, &r, sizeof f);
  return f;
}
inline float load_one(const float* p) { return *p; }
inline float load_one(const bf16* p) { return widen(*p); }
inline void store_one(float* p, float v) { *p = v; }
inline void store_one(bf16* p, float v) { *p = to_bf16(v); }
// Lane sums of up to 4 accumulators at once, each ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)):
// pairwise adds of shuffled vectors instead of 4 separate horizontal sums (short dot products, H = 128,
// spend a third of their time there otherwise). Missing accumulators are zeros: the order of every
// sum stays the same.
inline v8 pair_sums(v8 a, v8 b) {  // [a01 a23 b01 b23 | a45 a67 b45 b67]
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
template <int R>
inline void lane_sums(const v8* acc, float* out) {
  v8 v[4];
  for (int r = 0; r < 4; ++r) v[r] = r < R ? acc[r] : v8{};
  const v8 h = pair_sums(pair_sums(v[0], v[1]), pair_sums(v[2], v[3]));  // [s0 s1 s2 s3 | t0 t1 t2 t3]
  for (int r = 0; r < R; ++r) out[r] = h[r] + h[r + 4];
}
template <int R>  // R <= 8
inline void lane_sums_all(const v8* acc, float* out) {
  lane_sums<(R < 4 ? R : 4)>(acc, out);
  if constexpr (R > 4) lane_sums<R - 4>(acc + 4, out + 4);
}

// Where element k of a length-n vector is stored in the bf16 kernels: each full block of 16 holds its
// 8 even elements, then its 8 odd ones; a tail shorter than 16 stays in order.
inline int64_t position(int64_t k, int64_t n) {
  if (k >= n / 16 * 16) return k;
  const int64_t i = k % 16;
  return k - i + (i % 2) * 8 + i / 2;
}

// out[t][r] = dot(w + r * ldw, x[t]) over n floats, for R weight rows and T rows of x.
template <int R, int T>
inline void dot_f32(const float* w, int64_t ldw, const float* const* x, int64_t n, float (*out)[8]) {
  v8 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = v8{};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)  // whole blocks of 16, as the bf16 kernels take them
    for (int64_t j = k; j < k + 16; j += 8) {
      v8 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = load8(w + r * ldw + j);
      for (int t = 0; t < T; ++t) {
        const v8 xv = load8(x[t] + j);
        for (int r = 0; r < R; ++r) acc[t][r] = fma8(wv[r], xv, acc[t][r]);
      }
    }
  for (int t = 0; t < T; ++t) {
    lane_sums_all<R>(acc[t], out[t]);
    for (int r = 0; r < R; ++r)
      for (int64_t i = k; i < n; ++i) out[t][r] = std::fma(w[r * ldw + i], x[t][i], out[t][r]);
  }
}

// The same for bf16 weight rows and one row of x (deinterleaved): the weights are widened in registers.
// Same order of operations as `dot_f32` over the widened, deinterleaved rows (see `widen_rows`).
template <int R>
inline void dot_bf16(const bf16* w, int64_t ldw, const float* x, int64_t n, float (*out)[8]) {
  v8 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = v8{};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const v8 even = load8(x + k), odd = load8(x + k + 8);
    for (int r = 0; r < R; ++r) {
      u32x8 raw; std::memcpy(&raw, w + r * ldw + k, sizeof raw);
      const u32x8 lo = raw << 16, hi = raw & 0xffff0000u;
      v8 we, wo; std::memcpy(&we, &lo, sizeof we); std::memcpy(&wo, &hi, sizeof wo);
      acc[r] = fma8(we, even, acc[r]);
      acc[r] = fma8(wo, odd, acc[r]);
    }
  }
  lane_sums_all<R>(acc, out[0]);
  for (int r = 0; r < R; ++r)
    for (int64_t i = k; i < n; ++i) out[0][r] = std::fma(widen(w[r * ldw + i]), x[i], out[0][r]);
}

// A bf16 vector of n -> float32, deinterleaved (see `position`): the widening of `dot_bf16`, stored.
inline void widen_row(const bf16* w, int64_t n, float* out) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    u32x8 raw; std::memcpy(&raw, w + k, sizeof raw);
    const u32x8 lo = raw << 16, hi = raw & 0xffff0000u;
    std::memcpy(out + k, &lo, sizeof lo);
    std::memcpy(out + k + 8, &hi, sizeof hi);
  }
  for (; k < n; ++k) out[k] = widen(w[k]);
}

template <int R>
inline void tiles_f32(const float* w, int64_t ldw, const float* const* x, int64_t rows, int64_t n, float (*out)[8]) {
  int64_t t = 0;
  for (; t + ROWS_PER_TILE <= rows; t += ROWS_PER_TILE) dot_f32<R, ROWS_PER_TILE>(w, ldw, x + t, n, out + t);
  if (rows - t == 2) dot_f32<R, 2>(w, ldw, x + t, n, out + t);
  else if (rows - t == 1) dot_f32<R, 1>(w, ldw, x + t, n, out + t);
}

// out[t][r] = dot(weight row r, x[t]) for count (<= 8) weight rows and `rows` rows of x: one row at a
// time over all 8 weight rows (8 independent sums keep both FMA units busy), more in tiles of 4 weight rows.
template <int R>
inline void rows_times(const float* w, int64_t ldw, const float* const* x, int64_t rows, int64_t n, float (*out)[8]) {
  if (rows == 1) return dot_f32<R, 1>(w, ldw, x, n, out);
  tiles_f32<(R < 4 ? R : 4)>(w, ldw, x, rows, n, out);
  if constexpr (R > 4)  // the other weight rows into columns 4.. of the same rows of out
    tiles_f32<R - 4>(w + 4 * ldw, ldw, x, rows, n, reinterpret_cast<float(*)[8]>(&out[0][4]));
}

// out[t][r] = dot(weight row r, x[t]) for R (<= 8) weight rows and `rows` rows of x.
template <typename W, int R>
void weight_block(const W* w, int64_t ldw, const float* const* x, int64_t rows, int64_t n, float* buffer,
                  float (*out)[8]) {
  if constexpr (sizeof(W) == 2) {
    if (rows == 1) return dot_bf16<R>(w, ldw, x[0], n, out);
    for (int r = 0; r < R; ++r) widen_row(w + r * ldw, n, buffer + r * n);
    return weight_block<float, R>(buffer, n, x, rows, n, nullptr, out);
  } else {
    rows_times<R>(w, ldw, x, rows, n, out);
  }
}

template <typename W>
void weight_rows(const W* w, int64_t ldw, int64_t count, const float* const* x, int64_t rows, int64_t n,
                 float* buffer, float (*out)[8]) {
  switch (count) {
    case 8: return weight_block<W, 8>(w, ldw, x, rows, n, buffer, out);
    case 7: return weight_block<W, 7>(w, ldw, x, rows, n, buffer, out);
    case 6: return weight_block<W, 6>(w, ldw, x, rows, n, buffer, out);
    case 5: return weight_block<W, 5>(w, ldw, x, rows, n, buffer, out);
    case 4: return weight_block<W, 4>(w, ldw, x, rows, n, buffer, out);
    case 3: return weight_block<W, 3>(w, ldw, x, rows, n, buffer, out);
    case 2: return weight_block<W, 2>(w, ldw, x, rows, n, buffer, out);
    default: return weight_block<W, 1>(w, ldw, x, rows, n, buffer, out);
  }
}

// acc[r][v] = sum over k < K, in order, of w[r][k] * column k of panel v (PW rows of x; panels [*, K, PW],
// see `to_panel`), one fused multiply-add each: every accumulator is PW rows of x times one weight row, the
// weight element broadcast. No horizontal sums, so K = 128 runs as well as 4096, and a row's result does
// not depend on the other rows of its panel. R * V accumulators (+ V x vectors + 1 broadcast).
// Not inlined: inside its callers the compiler kept their epilogues' constants in registers and spilled
// accumulators to memory in this loop (2x slower at V = 1).
// bf16 (AVX512-BF16 builds): K counts pairs, a panel holds pair k of each of its 16 rows as one 32-bit
// word ([*, K, 16] words: what `to_panel` makes of bf16 rows read as words), and vdpbf16ps adds each
// lane's two products of a pair (weight pair broadcast) to its float32 accumulator: twice the products of
// a float32 FMA per instruction, float32 sums in k order as before (pair by pair).
// `ahead`: words from each weight row to the same row of the next tile, which is prefetched into L1 a
// cache line (16 words) at a time as this tile reads its own. Weight rows are short streams (2 KiB at
// K = 1024 bf16) that the hardware prefetchers barely learn before they end; with the next tile's rows on
// their way, Zen 5 (2 threads, expert FFN alone) runs bf16 OLMoE-like T=256 at 515 GFLOP/s instead of 414,
// Mixtral-like T=256 737 (677), T=128 572 (505); float32 Mixtral-like T=256 370 (343); the rest within 2%.
template <int R, int V, typename W>
__attribute__((noinline)) void panel_dots(const W* const* w, int64_t K, const float* panels, vec<PW> (&acc)[R][V],
                                          int64_t ahead) {
  vec<PW> sums[R][V];  // local: accumulators behind a reference are stored back on every k (they might alias w)
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) sums[r][v] = vec<PW>{};
  for (int64_t k = 0; k < K; ++k) {
    if (k % 16 == 0)
      for (int r = 0; r < R; ++r) __builtin_prefetch(reinterpret_cast<const float*>(w[r]) + ahead + k, 0, 3);
    vec<PW> xv[V];
    for (int v = 0; v < V; ++v) xv[v] = loadv<PW>(panels + (v * K + k) * PW);
    for (int r = 0; r < R; ++r) {
      if constexpr (std::is_same_v<W, float>) {
        const vec<PW> wv = splat<PW>(w[r][k]);
        for (int v = 0; v < V; ++v) sums[r][v] = fmav<PW>(wv, xv[v], sums[r][v]);
      } else {
#if defined(__AVX512BF16__)
        float pair;  // weights 2k and 2k + 1 of row r
        std::memcpy(&pair, w[r] + 2 * k, 4);
        const __m512bh wv = (__m512bh)_mm512_castps_si512(_mm512_set1_ps(pair));
        for (int v = 0; v < V; ++v)
          sums[r][v] = vec<PW>(_mm512_dpbf16_ps(__m512(sums[r][v]), wv, (__m512bh)_mm512_castps_si512(__m512(xv[v]))));
#endif
      }
    }
  }
  std::memcpy(acc, sums, sizeof sums);
}

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
// Rows e < n of out (ld elements apart) get R (<= 8) consecutive outputs each, col[r][e] rounded to bf16:
// the 8 x 16 halves transposed in registers (three rounds of unpacks, rows e and e + 8 in the two 128-bit
// lanes of a vector), then one masked store a row, instead of a rounding and a scalar store per output:
// bf16 expert FFN alone, OLMoE-like T=2048 (K = 512 in the down projection: short tiles) 755 -> 790 GFLOP/s.
template <int R>
inline void store_bf16_rows(const vec<16>* col, int64_t n, bf16* out, int64_t ld) {
  __m256i c[8], t[8], u[8];
  for (int r = 0; r < 8; ++r)
    c[r] = r < R ? _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(__m512(round_bf16v<16>(col[r]))), 16))
                 : _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {  // pairs of columns, rows 4j .. 4j + 3 of each lane
    t[2 * i] = _mm256_unpacklo_epi16(c[2 * i], c[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi16(c[2 * i], c[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i)  // quads of columns, two rows a vector lane
    for (int j = 0; j < 2; ++j) {
      u[4 * i + 2 * j] = _mm256_unpacklo_epi32(t[4 * i + j], t[4 * i + j + 2]);
      u[4 * i + 2 * j + 1] = _mm256_unpackhi_epi32(t[4 * i + j], t[4 * i + j + 2]);
    }
  const __mmask8 mask = (1u << R) - 1;
  for (int q = 0; q < 4; ++q)  // u[q] (columns 0-3) and u[4 + q] (4-7) hold rows 2q and 2q + 1 of each lane
    for (int half = 0; half < 2; ++half) {
      const __m256i row = half ? _mm256_unpackhi_epi64(u[q], u[4 + q]) : _mm256_unpacklo_epi64(u[q], u[4 + q]);
      const int64_t e = 2 * q + half;
      if (e < n) _mm_mask_storeu_epi16(out + e * ld, mask, _mm256_castsi256_si128(row));
      if (e + 8 < n) _mm_mask_storeu_epi16(out + (e + 8) * ld, mask, _mm256_extracti128_si256(row, 1));
    }
}
#endif

// out[m, n0 + r] = sum over k of w[n0 + r, k] * x[m, k] (see `panel_dots`) for R weight rows and the rows
// m < M of x in panels p0 .. p0 + V - 1; out has N columns. bf16: K elements, panels of K / 2 words.
// bias [N] (or null) is added to the rounded sums (GPT-OSS's down projection).
template <int R, int V, typename W>
inline void logits_tile(const W* w, int64_t K, const float* panels, int64_t p0, int64_t M, int64_t n0, int64_t N,
                        W* out, const W* bias) {
  const W* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = w + (n0 + r) * K;
  const int64_t words = K * sizeof(W) / 4;
  vec<PW> acc[R][V];
  panel_dots<R, V, W>(rows, words, panels + p0 * words * PW, acc, R * words);  // (rows n0 + R.. next)
  if (bias)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) {
        if constexpr (sizeof(W) == 2) acc[r][v] = round_bf16v<PW>(acc[r][v]);
        acc[r][v] += splat<PW>(load_one(bias + n0 + r));
      }
  for (int v = 0; v < V; ++v) {
    const int64_t m0 = (p0 + v) * PW, n = std::min<int64_t>(PW, M - m0);
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
    if constexpr (sizeof(W) == 2) {
      vec<PW> col[R];
      for (int r = 0; r < R; ++r) col[r] = acc[r][v];
      store_bf16_rows<std::min(R, 8)>(col, n, out + m0 * N + n0, N);
      if constexpr (R > 8) store_bf16_rows<R - 8>(col + 8, n, out + m0 * N + n0 + 8, N);
      continue;
    }
#endif
    for (int64_t e = 0; e < n; ++e)
      for (int r = 0; r < R; ++r) store_one(out + (m0 + e) * N + n0 + r, acc[r][v][e]);
  }
}

// Tiles: V panels (PANELS at most) times tile_rows<V>() weight rows. A weight row is a stream of its own,
// and rows of 4 KiB (K = 1024) share L1 sets, so a tile keeps its weight rows fewer than the ways of a set.
// 8 lanes (16 registers): 12 accumulators, 6 x 2 panels, 8 x 1 for a lone panel; measured with one thread,
// data in cache, on AMD Zen 2 (8-way L1): 6 x 2 100-106 GFLOP/s at K = 512-2048, 8 x 1 76-80, 4 x 3 78, 12
// rows at K >= 1024 2.5x slower. 16 lanes (32 registers): 24 accumulators, 6 x 4, 8 x 3, then 16 for 8 x 2
// and 8 x 1; on AMD Zen 5 (12-way L1), whole expert FFNs, 2 threads: Mixtral-like T=2048 433 GFLOP/s (8-lane
// tiles 230, 90% of the 2 x 240 peak), 4 x 4 2x slower. 8 x 3 takes what would be a lone panel after tiles of
// 4 (`panel_tiles`): experts of 33-48 rows (OLMoE-like T=256 has about half of them), 65-80 or 81-96: bf16
// OLMoE-like T=256 465-501 -> 512-535 GFLOP/s, Mixtral-like T=128 520-557 -> 568-602; float32 OLMoE-like
// T=256 243 -> 279. Two panels take 8 rows, not 12: with the next tile's rows prefetched (`panel_dots`), 12
// rows of 2 KiB (bf16, K = 1024) and the 12 after them are 12 lines a set, as many as its ways: bf16
// OLMoE-like T=256 540 -> 564 GFLOP/s, float32 288 -> 311 (12 x 2 had been 252 vs 238 before prefetching).
#if defined(__AVX512F__)
constexpr int PANELS = 4;
template <int V>
constexpr int tile_rows() { return V == 4 ? 6 : 8; }
#else
constexpr int PANELS = 2;
template <int V>
constexpr int tile_rows() { return V == 1 ? 8 : 12 / V; }
#endif

template <int V>
using panels_of = std::integral_constant<int, V>;

// Panels 0 .. n - 1 as tiles: f(first panel, panels_of<V>). 16 lanes: tiles of 4, the rest one tile of 3 or
// 2 (5 left: 3 + 2), a lone panel only where n is 1, so that every weight row is read by 24-accumulator tiles
// (a lone panel's 8 x 1 tile loads a broadcast per multiply). 8 lanes: tiles of 2, then a lone panel.
template <typename F>
inline void panel_tiles(int64_t n, F&& f) {
  int64_t p = 0;
  if constexpr (PANELS == 4) {
    for (; n - p > 5 || n - p == 4; p += 4) f(p, panels_of<4>{});
    if (n - p == 5) {
      f(p, panels_of<3>{});
      f(p + 3, panels_of<2>{});
    } else if (n - p == 3) {
      f(p, panels_of<3>{});
    } else if (n - p == 2) {
      f(p, panels_of<2>{});
    } else if (n - p == 1) {
      f(p, panels_of<1>{});
    }
  } else {
    for (; p + 2 <= n; p += 2) f(p, panels_of<2>{});
    if (p < n) f(p, panels_of<1>{});
  }
}

// Tiles of fewer than R weight rows, for what is left after the whole tiles.
template <int R, typename F>
inline void tail_tile(int64_t count, F&& f) {
  if constexpr (R > 0) {
    if (count == R) return f(std::integral_constant<int, R>{});
    tail_tile<R - 1>(count, f);
  }
}

template <int V, typename W>
inline void logits_rows(const W* w, int64_t K, const float* panels, int64_t p0, int64_t M, int64_t n0, int64_t count,
                        int64_t N, W* out, const W* bias = nullptr) {  // count weight rows from n0
  constexpr int R = tile_rows<V>();
  int64_t n = n0;
  for (; n + R <= n0 + count; n += R) logits_tile<R, V, W>(w, K, panels, p0, M, n, N, out, bias);
  tail_tile<R - 1>(n0 + count - n, [&](auto r) { logits_tile<decltype(r)::value, V, W>(w, K, panels, p0, M, n, N, out, bias); });
}

// exp(x) for W floats (Cephes' expf: x = n ln2 + r, |r| <= ln2/2, degree-5 polynomial; within 2 ulp of
// the true value): softmax weights of decode attention, where scalar expf was most of the time, and the
// SwiGLU epilogue of every gate/up tile. Latency is what it costs there (a tile's 6 vectors wait on it
// while the next tile's loop fills the reorder buffer), so the clamps are min/max and the floor one
// rounding instruction where AVX has them (the same values as the comparisons and conversions of the
// portable path, NaN included: checked bitwise on every 97th float bit pattern).
template <int W>
inline vec<W> expv(vec<W> x) {
  typedef vec<W> V;
  typedef int32_t Int __attribute__((vector_size(4 * W)));
  V n, t;
#if defined(__AVX512F__)
  if constexpr (W == 16) {
    x = V(_mm512_max_ps(__m512(V{} - 87.3365f), __m512(x)));
    x = V(_mm512_min_ps(__m512(V{} + 88.3762f), __m512(x)));
    t = fmav<W>(x, V{} + 1.44269504088896341f, V{} + 0.5f);
    n = V(_mm512_roundscale_ps(__m512(t), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
  } else
#endif
#if defined(__AVX__)
  if constexpr (W == 8) {
    // below -87.3: ~1e-38 instead of 0, the weight of a far-off key; max/min return their second
    // operand when one is NaN, so a NaN x stays NaN
    x = V(_mm256_max_ps(__m256(V{} - 87.3365f), __m256(x)));
    x = V(_mm256_min_ps(__m256(V{} + 88.3762f), __m256(x)));
    t = fmav<W>(x, V{} + 1.44269504088896341f, V{} + 0.5f);
    n = V(_mm256_floor_ps(__m256(t)));
  } else
#endif
  {
    x = x < -87.3365f ? V{} - 87.3365f : x;
    x = x > 88.3762f ? V{} + 88.3762f : x;
    t = fmav<W>(x, V{} + 1.44269504088896341f, V{} + 0.5f);
    n = __builtin_convertvector(__builtin_convertvector(t, Int), V);
    n = n + __builtin_convertvector(n > t, V);  // floor: a true comparison is -1
  }
  V r = fmav<W>(n, V{} - 0.693359375f, x);
  r = fmav<W>(n, V{} + 2.12194440e-4f, r);
  V y = V{} + 1.9875691500e-4f;
  y = fmav<W>(y, r, V{} + 1.3981999507e-3f);
  y = fmav<W>(y, r, V{} + 8.3334519073e-3f);
  y = fmav<W>(y, r, V{} + 4.1665795894e-2f);
  y = fmav<W>(y, r, V{} + 1.6666665459e-1f);
  y = fmav<W>(y, r, V{} + 5.0000001201e-1f);
  y = fmav<W>(y, r * r, r) + 1.0f;
  const Int bits = (__builtin_convertvector(n, Int) + 127) << 23;  // 2^n
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// r[i][e] <- r[e][i]: an 8 x 8 block of floats transposed in registers.
inline void transpose8(v8 (&r)[8]) {
  v8 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int j = 0; j < 2; ++j) {
      u[i + 2 * j] = __builtin_shufflevector(t[i + j], t[i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * j + 1] = __builtin_shufflevector(t[i + j], t[i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int i = 0; i < 4; ++i) {
    r[i] = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// One panel of PW rows of x: panel[k][e] = src[e][k] for the n (<= PW) rows given, zeros for the rest;
// transposed 8 x 8 at a time.
inline void to_panel(const float* const* src, int n, int64_t K, float* panel) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    for (int e0 = 0; e0 < PW; e0 += 8) {
      v8 r[8];
      for (int e = 0; e < 8; ++e) r[e] = e0 + e < n ? load8(src[e0 + e] + k) : v8{};
      transpose8(r);
      for (int i = 0; i < 8; ++i) std::memcpy(panel + (k + i) * PW + e0, &r[i], sizeof r[i]);
    }
  for (; k < K; ++k)
    for (int e = 0; e < PW; ++e) panel[k * PW + e] = e < n ? src[e][k] : 0.0f;
}

// What GPT-OSS's experts add to plain SwiGLU (kernels.moe's ExpertBiases and Activation): biases b13 [E, 2I]
// (gate rows, then up rows) and b2 [E, H], each added to its matmul's rounded output (null: none), and, where
// limit > 0, the clamped activation: gate clamped above at limit, up to [-limit, limit], then
// (up + 1) * (gate * sigmoid(gate * alpha)), in transformers' op order, each op rounded in bf16.
template <typename W>
struct Extras {
  const W* b13 = nullptr;
  const W* b2 = nullptr;
  float limit = 0, alpha = 1;
};
template <typename W>
Extras<W> extras(const void* b13, const void* b2, double limit, double alpha) {
  return {static_cast<const W*>(b13), static_cast<const W*>(b2), float(limit), float(alpha)};
}

// One activation element from the gate and up matmuls' float32 sums (bf16: rounded as transformers rounds).
// bias: the gate's bias (the up's is I further), or null.
template <typename W>
inline float activate(float gate, float up, const W* bias, int64_t I, const Extras<W>& ex) {
  constexpr bool bf = sizeof(W) == 2;
  auto rounded = [](float f) { return bf ? round_bf16(f) : f; };
  float g = rounded(gate), u = rounded(up);
  if (bias) {
    g = rounded(g + load_one(bias));
    u = rounded(u + load_one(bias + I));
  }
  if (ex.limit > 0) {  // (NaN stays NaN through both clamps, as in torch)
    g = ex.limit < g ? ex.limit : g;
    u = u < -ex.limit ? -ex.limit : ex.limit < u ? ex.limit : u;
    const float sigmoid = rounded(1.0f / (1.0f + std::exp(-rounded(g * ex.alpha))));
    return rounded(rounded(u + 1.0f) * rounded(g * sigmoid));
  }
  return rounded(rounded(g / (1.0f + std::exp(-g))) * u);
}

// The same for PW rows at once (lanes), as `swiglu_tile` takes them (the bias one value for all lanes), with
// exp within 2 ulp (see `expv`): plain SwiGLU is silu(g) * u = g / (1 + exp(-g)) * u, torch's formula.
template <typename W>
inline vec<PW> activate_lanes(vec<PW> gate, vec<PW> up, const W* bias, int64_t I, const Extras<W>& ex) {
  constexpr bool bf = sizeof(W) == 2;
  auto rounded = [](vec<PW> f) { if constexpr (bf) return round_bf16v<PW>(f); else return f; };
  vec<PW> g = rounded(gate), u = rounded(up);
  if (bias) {
    g = rounded(g + splat<PW>(load_one(bias)));
    u = rounded(u + splat<PW>(load_one(bias + I)));
  }
  if (ex.limit > 0) {
    const vec<PW> high = splat<PW>(ex.limit), low = splat<PW>(-ex.limit);
    g = high < g ? high : g;
    u = u < low ? low : high < u ? high : u;
    const vec<PW> sigmoid = rounded(1.0f / (expv<PW>(-rounded(g * ex.alpha)) + 1.0f));
    return rounded(rounded(u + 1.0f) * rounded(g * sigmoid));
  }
  return rounded(rounded(g / (expv<PW>(-g) + 1.0f)) * u);
}

// act rows i .. i + A - 1 of panels p0 .. p0 + V - 1 (act panels [*, I, PW], xp and actp at panel p0):
// the gate rows i.. and up rows I + i.. of one expert's w13 [2I, H] as the 2A weight rows of one tile,
// then silu(gate) * up in registers. bf16: rounded where transformers rounds (as `run_small` does), and
// act element i of a row written as half of word i / 2 of its panel (the layout `panel_dots` reads).
template <int A, int V, typename W>
inline void swiglu_tile(const W* w13, int64_t H, int64_t I, int64_t i, const float* xp, float* actp, const W* b13,
                        const Extras<W>& ex) {
  const W* rows[2 * A];
  for (int a = 0; a < A; ++a) {
    rows[a] = w13 + (i + a) * H;
    rows[A + a] = w13 + (I + i + a) * H;
  }
  vec<PW> acc[2 * A][V];
  panel_dots<2 * A, V, W>(rows, H * sizeof(W) / 4, xp, acc, A * H * sizeof(W) / 4);  // (gate and up rows i + A..)
  for (int v = 0; v < V; ++v)
    for (int a = 0; a < A; ++a) {
      const vec<PW> act = activate_lanes<W>(acc[a][v], acc[A + a][v], b13 ? b13 + i + a : nullptr, I, ex);
      if constexpr (std::is_same_v<W, float>) {
        std::memcpy(actp + (v * I + i + a) * PW, &act, sizeof act);
      } else {
#if defined(__AVX512BF16__)
        const int64_t k = i + a;  // even: the low half of word k / 2 (bits >> 16), odd: the high half
        const __m512i bits = _mm512_castps_si512(__m512(act));
        _mm512_mask_storeu_epi16(actp + (v * I / 2 + k / 2) * PW, k % 2 ? 0xaaaaaaaa : 0x55555555,
                                 k % 2 ? bits : _mm512_srli_epi32(bits, 16));
#endif
      }
    }
}

template <int V, typename W>
inline void swiglu_rows(const W* w13, int64_t H, int64_t I, int64_t i0, int64_t count, const float* xp,
                        float* actp, const W* b13, const Extras<W>& ex) {  // act rows i0 .. i0 + count - 1
  constexpr int A = tile_rows<V>() / 2;
  int64_t i = i0;
  for (; i + A <= i0 + count; i += A) swiglu_tile<A, V, W>(w13, H, I, i, xp, actp, b13, ex);
  tail_tile<A - 1>(i0 + count - i, [&](auto a) { swiglu_tile<decltype(a)::value, V, W>(w13, H, I, i, xp, actp, b13, ex); });
}

// Groups with at least `panel_rows` rows (kernels/native.py: PANEL_ROWS), as GEMMs: a
// group's rows of x become panels of PW ([ceil(rows / PW), H, PW] words), gate/up tiles write the
// activation straight into panels ([.., I, PW]) and the down projection reads them (see `panel_dots`);
// each weight element loaded once per tile of PW * V rows, and no horizontal sums: on AVX2 80-90% of the
// FMA peak where MKL's sgemm reaches ~65%. bf16 (AVX512-BF16 builds only): the same on vdpbf16ps, the
// words of a row being its pairs of bf16s. Every output is one chain of fused multiply-adds over k in order:
// a row's bits do not depend on the others in its group (but differ from the dot products of `run_small`
// in the order of additions).
// Consecutive groups are taken PANEL_CHUNK_BYTES of panels at a time, so that the panels stay in cache
// between the phases. Phases are split over the threads by (group, panel or block of weight rows).
constexpr int64_t PANEL_CHUNK_BYTES = 8 << 20;
// Weight rows of a work item, in whole tiles (a multiple of 24 rows: of 6 and 8, and halved, of 3 and 4).
// A group of more than one tile of panels reads its item's rows once a tile of panels: ITEM_BYTES of them,
// which stay in L2 (1 MiB on Zen 5) while every panel passes. A group of one tile of panels reads them once:
// ONE_TILE_BYTES, larger, since each item starts its weight stream cold (the prefetch of `panel_dots` runs
// one tile ahead within an item; the next item may be another thread's). Zen 5, 2 threads, against 48-row
// items: bf16 OLMoE-like T=256 571 -> 678 GFLOP/s, Mixtral-like T=128 590 -> 661, T=256 755 -> 782, T=2048
// 843 -> 847; float32 OLMoE-like T=256 317 -> 345.
constexpr int64_t ITEM_BYTES = 384 << 10, ONE_TILE_BYTES = 1 << 20;
inline int64_t item_rows(int64_t row_bytes, int64_t group_rows) {
  const int64_t bytes = (group_rows + PW - 1) / PW <= PANELS ? ONE_TILE_BYTES : ITEM_BYTES;
  return std::max<int64_t>(bytes / row_bytes / 24 * 24, 24);
}

// Work items (g, first, count) for rows 0 .. n - 1 of group g, `size` rows each; in the phase's last group
// the last `num_threads` items are cut into tiles of `tile` rows, so that the threads finish the phase
// together (they wait for each other at its end: with whole items, half an item each on average).
inline void blocks(int64_t g, int64_t n, int64_t size, int64_t tile, int num_threads, bool last,
                   std::vector<int64_t>& items) {
  const int64_t split = last ? std::max<int64_t>(0, n - num_threads * size) / size * size : n;
  for (int64_t first = 0; first < split; first += size) items.insert(items.end(), {g, first, std::min(size, n - first)});
  for (int64_t first = split; first < n; first += tile) items.insert(items.end(), {g, first, std::min(tile, n - first)});
}

template <typename W>
void run_panels(const std::vector<int64_t>& groups, const int64_t* rows, const W* x, const W* w13, const W* w2,
                int64_t H, int64_t I, W* out, const Extras<W>& ex, int num_threads) {
  const int64_t Hw = H * sizeof(W) / 4, Iw = I * sizeof(W) / 4;  // words of a row of x, of act
  thread_local std::vector<float> panels;  // kept between calls: no page faults on the next batch
  const int64_t num_groups = int64_t(groups.size() / 3);
  for (int64_t g0 = 0, g1; g0 < num_groups; g0 = g1) {
    std::vector<int64_t> offsets;  // the x panels of each group of the chunk, then its act panels
    int64_t size = 0;
    for (g1 = g0; g1 < num_groups; ++g1) {
      const int64_t need = (groups[3 * g1 + 2] + PW - 1) / PW * PW * (Hw + Iw);
      if (g1 > g0 && (size + need) * 4 > PANEL_CHUNK_BYTES) break;
      offsets.push_back(size);
      size += need;
    }
    if (int64_t(panels.size()) < size) panels.resize(size);
    float* const base = panels.data();  // (inside the parallel region `panels` would be each thread's own)
    // work items: (group, panel), (group, first act row, count), (group, first output row, count)
    std::vector<int64_t> pack, act, down;
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t p = 0; p < (groups[3 * g + 2] + PW - 1) / PW; ++p) pack.insert(pack.end(), {g, p});
      blocks(g, I, item_rows(H * sizeof(W), groups[3 * g + 2]) / 2, tile_rows<PANELS>() / 2, num_threads, g == g1 - 1, act);
      blocks(g, H, item_rows(I * sizeof(W), groups[3 * g + 2]), tile_rows<PANELS>(), num_threads, g == g1 - 1, down);
    }
    auto x_panels = [&](int64_t g) { return base + offsets[g - g0]; };
    auto act_panels = [&](int64_t g) { return x_panels(g) + (groups[3 * g + 2] + PW - 1) / PW * PW * Hw; };
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(dynamic, 4)
      for (int64_t item = 0; item < int64_t(pack.size() / 2); ++item) {
        const int64_t g = pack[2 * item], p = pack[2 * item + 1];
        const int64_t first = groups[3 * g + 1] + PW * p, n = std::min<int64_t>(PW, groups[3 * g + 2] - PW * p);
        const float* src[PW];
        for (int64_t e = 0; e < n; ++e) src[e] = reinterpret_cast<const float*>(x + (rows ? rows[first + e] : first + e) * H);
        to_panel(src, int(n), Hw, x_panels(g) + p * Hw * PW);
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < int64_t(act.size() / 3); ++item) {
        const int64_t g = act[3 * item], i = act[3 * item + 1], count = act[3 * item + 2];
        const int64_t num_panels = (groups[3 * g + 2] + PW - 1) / PW;
        const W* w = w13 + groups[3 * g] * 2 * I * H;
        panel_tiles(num_panels, [&](int64_t p, auto v) {
          swiglu_rows<decltype(v)::value, W>(w, H, I, i, count, x_panels(g) + p * Hw * PW, act_panels(g) + p * Iw * PW,
                                             ex.b13 ? ex.b13 + groups[3 * g] * 2 * I : nullptr, ex);
        });
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < int64_t(down.size() / 3); ++item) {
        const int64_t g = down[3 * item], h = down[3 * item + 1], count = down[3 * item + 2];
        const int64_t first = groups[3 * g + 1], num_rows = groups[3 * g + 2], num_panels = (num_rows + PW - 1) / PW;
        const W* w = w2 + groups[3 * g] * H * I;
        panel_tiles(num_panels, [&](int64_t p, auto v) {
          logits_rows<decltype(v)::value, W>(w, I, act_panels(g), p, num_rows, h, count, H, out + first * H,
                                             ex.b2 ? ex.b2 + groups[3 * g] * H : nullptr);
        });
      }
    }
  }
}

#if defined(__AVX512BF16__)
// out[t][r] = dot(w + r * ldw, x[t]) over n bf16s, for R weight rows and T rows of x in one pass, on
// vdpbf16ps: 32 elements an instruction into 16 float32 lanes (a tail of fewer as zeros), the lanes then
// added by _mm512_reduce_add_ps. R and T are constants, so that the loop keeps its accumulators and
// addresses in registers (with the count of rows at run time it kept row pointers on the stack and tested
// every row: 10% slower at Mixtral-like T=16).
// `prefetch` (the first pass over the rows): the same rows of the next block of 8 weight rows are
// prefetched into L1 as these are read (see `panel_dots`; OLMoE-like T=64 bf16 expert FFN 158 -> 174
// GFLOP/s, T=16 75 -> 82).
template <int T, int R>
inline void dot_pairs_tile(const bf16* w, int64_t ldw, const bf16* const* x, int64_t n, float (*out)[8], bool prefetch) {
  const __mmask32 tail = n % 32 ? (1u << (n % 32)) - 1 : 0;
  const bf16* xs[T];
  for (int t = 0; t < T; ++t) xs[t] = x[t];
  __m512 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    __m512bh xv[T];
    for (int t = 0; t < T; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(xs[t] + k);
    if (prefetch)
      for (int r = 0; r < R; ++r) __builtin_prefetch(w + (8 + r) * ldw + k, 0, 3);
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * ldw + k);
      for (int t = 0; t < T; ++t) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], wv, xv[t]);
    }
  }
  if (tail) {
    __m512bh xv[T];
    for (int t = 0; t < T; ++t) xv[t] = (__m512bh)_mm512_maskz_loadu_epi16(tail, xs[t] + k);
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + r * ldw + k);
      for (int t = 0; t < T; ++t) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], wv, xv[t]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) out[t][r] = _mm512_reduce_add_ps(acc[t][r]);
}

// R weight rows times every row of x, up to P rows of x a pass: R * P accumulators (16 or 20). The rows
// stay in L1 between passes.
template <int R>
inline void dot_pairs_block(const bf16* w, int64_t ldw, const bf16* const* x, int64_t rows, int64_t n,
                            float (*out)[8]) {
  constexpr int P = R == 8 ? 2 : 5;
  for (int64_t t = 0; t < rows; t += P) {
    const bool first = t == 0;
    switch (std::min<int64_t>(P, rows - t)) {
      case 1: dot_pairs_tile<1, R>(w, ldw, x + t, n, out + t, first); break;
      case 2: dot_pairs_tile<2, R>(w, ldw, x + t, n, out + t, first); break;
      case 3: if constexpr (P >= 3) dot_pairs_tile<3, R>(w, ldw, x + t, n, out + t, first); break;
      case 4: if constexpr (P >= 4) dot_pairs_tile<4, R>(w, ldw, x + t, n, out + t, first); break;
      default: if constexpr (P >= 5) dot_pairs_tile<5, R>(w, ldw, x + t, n, out + t, first); break;
    }
  }
}

// out[t][r] for count (<= 8) weight rows and `rows` rows of x. One or two rows of x: all 8 weight rows in
// one pass; more: 4 weight rows at a time with up to 5 rows of x a pass, so that each weight row is read
// from memory by one pass (2 x 4 rows x 4 rows of x instead of 2 passes of 8 x 2: Mixtral-like T=16 bf16
// expert FFN ~8% faster). A row's sums do not depend on how the rows are tiled (same bits).
inline void dot_pairs(const bf16* w, int64_t ldw, int64_t count, const bf16* const* x, int64_t rows, int64_t n,
                      float (*out)[8]) {
  auto columns = [&](int64_t r) { return reinterpret_cast<float(*)[8]>(&out[0][r]); };  // out[t][r..]
  if (count == 8 && rows <= 2) return dot_pairs_block<8>(w, ldw, x, rows, n, out);
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) dot_pairs_block<4>(w + r * ldw, ldw, x, rows, n, columns(r));
  if (count - r >= 2) {
    dot_pairs_block<2>(w + r * ldw, ldw, x, rows, n, columns(r));
    r += 2;
  }
  if (r < count) dot_pairs_block<1>(w + r * ldw, ldw, x, rows, n, columns(r));
}

// `weight_rows` for bf16 rows of x read in place (`run_small` on AVX512-BF16 builds).
inline void weight_rows(const bf16* w, int64_t ldw, int64_t count, const bf16* const* x, int64_t rows, int64_t n,
                        float*, float (*out)[8]) {
  dot_pairs(w, ldw, count, x, rows, n, out);
}
#endif

template <typename W>
void run_small(int64_t num_groups, const int64_t* groups, int64_t num_rows, const int64_t* rows, const W* x, const W* w13,
         const W* w2, int64_t H, int64_t I, float* scratch, W* out, const Extras<W>& ex, int num_threads) {
  // bf16 on AVX512-BF16 builds (`pairs`): x and act stay bf16, read in place by vdpbf16ps (`dot_pairs`);
  // elsewhere they are float32, bf16 ones widened and deinterleaved (see `position`).
  constexpr bool bf = sizeof(W) == 2, pairs = bf && BF16_PANELS;
  using X = std::conditional_t<pairs, bf16, float>;  // a row of x or act as the dot products read it
  X* act = reinterpret_cast<X*>(scratch);   // [N, I]
  float* widened = scratch + num_rows * I;  // bf16 without pairs: [N, H] the rows of x as float32
  std::vector<const X*> xs(num_rows), acts(num_rows);
  int64_t most = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t first = groups[3 * g + 1], count = groups[3 * g + 2];
    most = std::max(most, count);
    for (int64_t j = first; j < first + count; ++j) {
      const W* row = x + (rows ? rows[j] : j) * H;
      if constexpr (bf && !pairs) {
        widen_row(row, H, widened + j * H);
        xs[j] = widened + j * H;
      } else {
        xs[j] = row;
      }
      acts[j] = act + j * I;
    }
  }
  const int64_t blocks1 = (I + BLOCK - 1) / BLOCK, blocks2 = (H + BLOCK - 1) / BLOCK;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> buffer(bf && !pairs ? 8 * std::max(H, I) : 0);  // bf16 weight rows widened
    std::vector<float> results(3 * most * 8);
    float(*gate)[8] = reinterpret_cast<float(*)[8]>(results.data());
    float(*up)[8] = gate + most;
    float(*down)[8] = up + most;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < num_groups * blocks1; ++item) {  // act = silu(gate) * up, BLOCK columns at a time
      const int64_t* group = groups + 3 * (item / blocks1);
      const int64_t first = group[1], count = group[2], begin = (item % blocks1) * BLOCK;
      const W* w = w13 + group[0] * 2 * I * H;
      const W* bias = ex.b13 ? ex.b13 + group[0] * 2 * I : nullptr;
      for (int64_t i = begin; i < std::min(I, begin + BLOCK); i += 8) {
        const int64_t c = std::min<int64_t>(8, I - i);
        weight_rows(w + i * H, H, c, xs.data() + first, count, H, buffer.data(), gate);
        weight_rows(w + (I + i) * H, H, c, xs.data() + first, count, H, buffer.data(), up);
        for (int64_t t = 0; t < count; ++t)
          for (int64_t r = 0; r < c; ++r) {
            const float a = activate<W>(gate[t][r], up[t][r], bias ? bias + i + r : nullptr, I, ex);
            if constexpr (pairs) act[(first + t) * I + i + r] = to_bf16(a);
            else act[(first + t) * I + (bf ? position(i + r, I) : i + r)] = a;
          }
      }
    }  // (the end of an omp for waits for all threads: every act row is complete below)
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < num_groups * blocks2; ++item) {  // out = w2 @ act, BLOCK outputs at a time
      const int64_t* group = groups + 3 * (item / blocks2);
      const int64_t first = group[1], count = group[2], begin = (item % blocks2) * BLOCK;
      const W* w = w2 + group[0] * H * I;
      const W* bias = ex.b2 ? ex.b2 + group[0] * H : nullptr;
      for (int64_t h = begin; h < std::min(H, begin + BLOCK); h += 8) {
        const int64_t c = std::min<int64_t>(8, H - h);
        weight_rows(w + h * I, I, c, acts.data() + first, count, I, buffer.data(), down);
        for (int64_t t = 0; t < count; ++t)
          for (int64_t r = 0; r < c; ++r) {
            const float y = bf ? round_bf16(down[t][r]) : down[t][r];  // (exact where it is stored as is)
            store_one(out + (first + t) * H + h + r, bias ? y + load_one(bias + h + r) : y);
          }
      }
    }
  }
}

template <typename T>
inline v8 load8_any(const T* p) {  // 8 consecutive values as float32, in order
  if constexpr (sizeof(T) == 4) {
    return load8(reinterpret_cast<const float*>(p));
  } else {
    typedef uint16_t u16x8 __attribute__((vector_size(16)));
    u16x8 h;
    std::memcpy(&h, p, sizeof h);
    const u32x8 w = __builtin_convertvector(h, u32x8) << 16;
    v8 v;
    std::memcpy(&v, &w, sizeof v);
    return v;
  }
}

// For each of G heads h: acc_h[0 .. 8V) += sum over i, in order, of p_h[i] * row i (values + slots[i] *
// stride), p_h = p + h * ld: float32 partial sums acc_h = acc + h * acc_ld, carried between blocks of rows
// exactly; the first block starts from zeros instead, and the last writes out_h = out + h * out_ld =
// acc_h / total[h] instead. The G heads share each row's load.
template <int G, int V, typename T>
inline void weighted_sum(const T* values, const int64_t* slots, int64_t stride, const float* p, int64_t ld,
                         int64_t count, float* acc, int64_t acc_ld, bool first, bool last, const float* total, T* out,
                         int64_t out_ld) {
  v8 sums[G][V] = {};
  if (!first)
    for (int h = 0; h < G; ++h)
      for (int u = 0; u < V; ++u) sums[h][u] = load8(acc + h * acc_ld + 8 * u);
  for (int64_t i = 0; i < count; ++i) {
    const T* row = values + slots[i] * stride;
    v8 x[V];
    for (int u = 0; u < V; ++u) x[u] = load8_any(row + 8 * u);
    for (int h = 0; h < G; ++h) {
      const v8 weight = v8{} + p[h * ld + i];
      for (int u = 0; u < V; ++u) sums[h][u] = fma8(weight, x[u], sums[h][u]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int u = 0; u < V; ++u)
      if (last)
        for (int e = 0; e < 8; ++e) store_one(out + h * out_ld + 8 * u + e, sums[h][u][e] / total[h]);
      else
        std::memcpy(acc + h * acc_ld + 8 * u, &sums[h][u], sizeof(v8));
}

// scores[h * ld + i] = dot(query h, key i) * scale for G query heads (rows of D floats) and 4 keys; the
// heads share each key vector's load and the keys each query vector's. Every score is the one dot
// product of `attend_one` (8 lanes in order over whole, lane sums, then the tail in order).
template <int G, typename T>
inline void score_tile(const float* queries, int64_t D, int64_t whole, const T* const* keys, int64_t n, float scale,
                       float* scores, int64_t ld) {
  v8 sums[G][4] = {};
  for (int64_t d = 0; d < whole; d += 8) {
    if constexpr (G == 1) {  // keys straight into the multiply-adds: at D = 32 the loads first cost 7%
      const v8 x = load8(queries + d);
      for (int i = 0; i < 4; ++i) sums[0][i] = fma8(x, load8_any(keys[i] + d), sums[0][i]);
    } else {
      v8 k[4];
      for (int i = 0; i < 4; ++i) k[i] = load8_any(keys[i] + d);
      for (int h = 0; h < G; ++h) {
        const v8 x = load8(queries + h * D + d);
        for (int i = 0; i < 4; ++i) sums[h][i] = fma8(x, k[i], sums[h][i]);
      }
    }
  }
  for (int h = 0; h < G; ++h) {
    float dots[4];
    lane_sums<4>(sums[h], dots);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t d = whole; d < D; ++d) dots[i] = std::fma(queries[h * D + d], load_one(keys[i] + d), dots[i]);
      scores[h * ld + i] = dots[i] * scale;
    }
  }
}

// One sequence's query heads that share kv head `kv`, over its context: see moeray_decode_attention.
// Key rows are D long; value rows Dv (<= D) long, `v_slot` elements apart from slot to slot and
// `v_head` from head to head (MLA: the value is the first Dv numbers of the key row itself).
template <typename T>
void attend_one(const T* q, const T* k_cache, const T* v_cache, const int64_t* slots, int64_t first, int64_t len,
                int64_t nkv, int64_t kv, int64_t group, int64_t D, int64_t Dv, int64_t v_slot, int64_t v_head,
                float scale, const float* sinks, T* out, std::vector<float>& work) {
  const int64_t span = len - first, ctx = (span + 7) / 8 * 8, whole = D / 8 * 8, whole_v = Dv / 8 * 8;
  if (span <= 0) {  // an empty context (never asked for by the engine): nothing to attend to
    for (int64_t i = 0; i < group * Dv; ++i) store_one(out + i, 0.0f);
    return;
  }
  work.resize(group * (D + ctx + 1 + whole_v));
  float* queries = work.data();         // [group, D]
  float* scores = queries + group * D;  // [group, ctx], then the [group] softmax sums and [group, whole_v] outputs
  for (int64_t i = 0; i < group * D; ++i) queries[i] = load_one(q + i);
  auto at = [&](const T* cache, int64_t i) { return cache + (slots[first + std::min(i, span - 1)] * nkv + kv) * D; };
  // Scores, 4 keys at a time (past the end: the last again, unused). Many heads (MLA: every query head
  // on one kv head) take keys in blocks of KEY_BLOCK (kept in L1 while every head passes) and heads in
  // pairs; else all of them would stream from L2 for each 4 keys. Few heads go one at a time: at the
  // built-in model's 2 heads of 32 the pairs cost 5-6% of the call (the same numbers either way).
  constexpr int64_t KEY_BLOCK = 8;
  if (group >= 4) {
    for (int64_t j0 = 0; j0 < span; j0 += KEY_BLOCK)
      for (int64_t g = 0; g < group; g += 2)
        for (int64_t j = j0; j < std::min(span, j0 + KEY_BLOCK); j += 4) {
          const T* keys[4] = {at(k_cache, j), at(k_cache, j + 1), at(k_cache, j + 2), at(k_cache, j + 3)};
          const int64_t n = std::min<int64_t>(4, span - j);
          if (g + 1 < group) score_tile<2>(queries + g * D, D, whole, keys, n, scale, scores + g * ctx + j, ctx);
          else score_tile<1>(queries + g * D, D, whole, keys, n, scale, scores + g * ctx + j, ctx);
        }
  } else {
    for (int64_t j = 0; j < span; j += 4) {
      const T* keys[4] = {at(k_cache, j), at(k_cache, j + 1), at(k_cache, j + 2), at(k_cache, j + 3)};
      for (int64_t g = 0; g < group; ++g)
        score_tile<1>(queries + g * D, D, whole, keys, std::min<int64_t>(4, span - j), scale, scores + g * ctx + j, ctx);
    }
  }
  float* totals = scores + group * ctx;  // [group]
  for (int64_t g = 0; g < group; ++g) {  // softmax weights (unnormalised) and their sums
    float* p = scores + g * ctx;
    float most = sinks ? sinks[g] : -INFINITY, total = 0;  // a head's sink is one more logit, with no value
    for (int64_t i = 0; i < span; ++i) most = std::max(most, p[i]);
    for (int64_t i = span; i < ctx; ++i) p[i] = most;  // padding: exp(0), never read back
    for (int64_t i = 0; i < ctx; i += 8) {
      const v8 e = expv<8>(load8(p + i) - most);
      std::memcpy(p + i, &e, sizeof e);
    }
    for (int64_t i = 0; i < span; ++i) total += p[i];
    totals[g] = sinks ? total + std::exp(sinks[g] - most) : total;
  }
  // The weighted sums of values: rows in blocks of 64 KiB (kept in L2 while every head passes, so that
  // the values are read once, not once per head), heads in pairs; sums carried in float32 between blocks.
  const int64_t VALUE_BLOCK = std::max<int64_t>(64, (64 << 10) / (Dv * int64_t(sizeof(T))));
  const T* values = v_cache + kv * v_head;
  float* sums = totals + group;  // [group, whole_v]
  for (int64_t i0 = 0; i0 < span; i0 += VALUE_BLOCK) {
    const int64_t count = std::min(VALUE_BLOCK, span - i0);
    for (int64_t g = 0; g < group; g += 2)
      for (int64_t d0 = 0; d0 < whole_v; d0 += 32) {  // up to 4 vectors of the output at a time, in registers
        auto sum = [&](auto heads, auto vectors) {
          weighted_sum<decltype(heads)::value, decltype(vectors)::value>(
              values + d0, slots + first + i0, v_slot, scores + g * ctx + i0, ctx, count, sums + g * whole_v + d0, whole_v,
              i0 == 0, i0 + count == span, totals + g, out + g * Dv + d0, Dv);
        };
        auto by_width = [&](auto heads) {
          switch (std::min<int64_t>(4, (whole_v - d0) / 8)) {
            case 4: return sum(heads, std::integral_constant<int, 4>{});
            case 3: return sum(heads, std::integral_constant<int, 3>{});
            case 2: return sum(heads, std::integral_constant<int, 2>{});
            default: return sum(heads, std::integral_constant<int, 1>{});
          }
        };
        if (g + 1 < group) by_width(std::integral_constant<int, 2>{});
        else by_width(std::integral_constant<int, 1>{});
      }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = whole_v; d < Dv; ++d) {  // the tail, one number at a time
      float acc = 0;
      for (int64_t i = 0; i < span; ++i)
        acc = std::fma(scores[g * ctx + i], load_one(values + slots[first + i] * v_slot + d), acc);
      store_one(out + g * Dv + d, acc / totals[g]);
    }
}

template <typename W>
void run(int64_t num_groups, const int64_t* groups, int64_t num_rows, const int64_t* rows, const W* x, const W* w13,
         const W* w2, int64_t H, int64_t I, float* scratch, W* out, const Extras<W>& ex, int64_t panel_rows,
         int num_threads) {
  std::vector<int64_t> small, large;  // groups with many rows are GEMMs (run_panels)
  const bool panels = sizeof(W) == 4 || (BF16_PANELS && H % 2 == 0 && I % 2 == 0);  // bf16: whole pairs
  for (int64_t g = 0; g < num_groups; ++g) {
    std::vector<int64_t>& to = panels && groups[3 * g + 2] >= panel_rows ? large : small;
    to.insert(to.end(), groups + 3 * g, groups + 3 * g + 3);
  }
  if constexpr (sizeof(W) == 4 || BF16_PANELS)
    if (!large.empty()) run_panels<W>(large, rows, x, w13, w2, H, I, out, ex, num_threads);
  if (!small.empty())
    run_small(int64_t(small.size() / 3), small.data(), num_rows, rows, x, w13, w2, H, I, scratch, out, ex, num_threads);
}

// 8 lanes of a row, stored as float32 or rounded to bf16 (nearest even).
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
inline void store8(bf16* p, v8 v) {
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  u32x8 w;
  const v8 r = round_bf16v<8>(v);
  std::memcpy(&w, &r, sizeof w);
  const u16x8 h = __builtin_convertvector(w >> 16, u16x8);
  std::memcpy(p, &h, sizeof h);
}

// One token's output: out[h] = the sum over k, in top-k order, of weights[k] * y[row[k] * H + h], with
// the bits of kernels.moe.combine. float32 rows: a fused multiply-add per k (torch.embedding_bag). bf16
// rows: each product in the promoted dtype of row and weight (rounded to bf16 for bf16 weights, as
// Qwen-MoE / OLMoE scale; float32 for float32 weights, as Mixtral), added in float32 one at a time, the
// sum rounded to bf16 once.
template <typename T, typename S>
void combine(const T* y, const int64_t* row, const S* weights, int64_t K, int64_t H, T* out) {
  int64_t h = 0;
  for (; h + 8 <= H; h += 8) {
    v8 acc{};
    for (int64_t k = 0; k < K; ++k) {
      const v8 w = splat8(load_one(weights + k)), value = load8_any(y + row[k] * H + h);
      if constexpr (sizeof(T) == 4) {
        acc = fma8(w, value, acc);
      } else {
        v8 product = w * value;
        if constexpr (sizeof(S) == 2) product = round_bf16v<8>(product);
        acc = k ? acc + product : product;
      }
    }
    store8(out + h, acc);
  }
  for (; h < H; ++h) {
    float acc = 0;
    for (int64_t k = 0; k < K; ++k) {
      const float w = load_one(weights + k), value = load_one(y + row[k] * H + h);
      if constexpr (sizeof(T) == 4) {
        acc = std::fma(w, value, acc);
      } else {
        float product = w * value;
        if constexpr (sizeof(S) == 2) product = round_bf16(product);
        acc = k ? acc + product : product;
      }
    }
    store_one(out + h, acc);
  }
}

// moeray_fused_moe for x, weights and out of type T and top-k weights of type S (see there).
template <typename T, typename S>
void fused(int64_t num_tokens, int64_t K, const int64_t* topk_ids, const S* topk_weights, const T* x, const T* w13,
           const T* w2, int64_t E, int64_t H, int64_t I, T* out, const Extras<T>& ex, int64_t panel_rows,
           int num_threads) {
  const int64_t P = num_tokens * K;
  std::vector<int64_t> counts(E), fill(E), sorted_row(P), rows(P), groups;
  for (int64_t p = 0; p < P; ++p) ++counts[topk_ids[p]];
  for (int64_t e = 0, start = 0; e < E; start += counts[e++]) {
    fill[e] = start;
    if (counts[e]) groups.insert(groups.end(), {e, start, counts[e]});
  }
  for (int64_t p = 0; p < P; ++p) {
    const int64_t j = fill[topk_ids[p]]++;
    sorted_row[p] = j;
    rows[j] = p / K;
  }
  // [P, H] expert outputs (sorted), then run's float32 scratch ([P, I] activations; bf16: + [P, H]), every
  // row written before it is read; kept between calls, as fresh memory would page-fault its way through
  // every prefill (~5% at T=2048)
  const int64_t y_words = (P * H * int64_t(sizeof(T)) + 3) / 4, scratch_words = P * (I + (sizeof(T) == 2 ? H : 0));
  thread_local std::vector<float> workspace;
  if (workspace.size() < size_t(y_words + scratch_words)) workspace.resize(y_words + scratch_words);
  T* const y = reinterpret_cast<T*>(workspace.data());
  run<T>(int64_t(groups.size() / 3), groups.data(), P, rows.data(), x, w13, w2, H, I, workspace.data() + y_words, y, ex,
         panel_rows, num_threads);
#pragma omp parallel for num_threads(num_threads) if (P * H >= (1 << 16))
  for (int64_t t = 0; t < num_tokens; ++t)
    combine(y, sorted_row.data() + t * K, topk_weights + t * K, K, H, out + t * H);
}

// torch's float32 sum of the squares of x[0 .. n) (`x.pow(2).sum(-1)` on the CPU, with vectors of W
// lanes: 8 on AVX2 builds, 16 on AVX-512), in its order of additions (aten/src/ATen/native/cpu/
// SumKernel.cpp, vectorized_inner_sum): the squares taken as vectors, vector i added into partial sum
// i % 4 through a cascade of levels (level_step vectors a level, so only sums of similar size meet);
// the levels added down, the leftover vectors added to partial 0, partials 1-3 added to it in order;
// then, from 0, the scalar tail and the W lanes of the vector, in order. n >= W.
template <int W>
float torch_sum_squares(const float* x, int64_t n) {
  struct Vec {
    float lane[W];
    void add(const Vec& o) {
      for (int l = 0; l < W; ++l) lane[l] += o.lane[l];
    }
  };
  auto squares = [x](int64_t i) {
    Vec v;
    for (int l = 0; l < W; ++l) v.lane[l] = x[i * W + l] * x[i * W + l];
    return v;
  };
  constexpr int levels = 4, ilp = 4;
  const int64_t vectors = n / W, size = vectors / ilp;  // size: rows of ilp vectors
  const int64_t ceil_log2 = size <= 2 ? 1 : 64 - __builtin_clzll(uint64_t(size - 1));
  const int64_t power = std::max<int64_t>(4, ceil_log2 / levels), step = int64_t(1) << power, mask = step - 1;
  Vec acc[levels][ilp] = {};
  int64_t i = 0;
  while (i + step <= size) {
    for (int64_t j = 0; j < step; ++j, ++i)
      for (int k = 0; k < ilp; ++k) acc[0][k].add(squares(i * ilp + k));
    for (int j = 1; j < levels; ++j) {
      for (int k = 0; k < ilp; ++k) {
        acc[j][k].add(acc[j - 1][k]);
        acc[j - 1][k] = Vec{};
      }
      if (i & (mask << (j * power))) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < ilp; ++k) acc[0][k].add(squares(i * ilp + k));
  for (int j = 1; j < levels; ++j)
    for (int k = 0; k < ilp; ++k) acc[0][k].add(acc[j][k]);
  for (int64_t v = size * ilp; v < vectors; ++v) acc[0][0].add(squares(v));
  for (int k = 1; k < ilp; ++k) acc[0][0].add(acc[0][k]);
  float total = 0;
  for (int64_t k = vectors * W; k < n; ++k) total += x[k] * x[k];
  for (int l = 0; l < W; ++l) total += acc[0][0].lane[l];
  return total;
}

}  // namespace

extern "C" {

// Rotary embedding of float32 heads, op for op kernels/rope.py's `rotate` (transformers' x * cos +
// rotate_half(x) * sin): out = x * cos + swap_halves(x) * signed_sin, each product rounded, then the sum.
// x [T, heads, D], rows x_stride floats apart (the q and k heads of a fused projection), heads contiguous;
// cos, signed_sin [T, D]; out [T, heads, D] contiguous. D even. Returns 0.
int moeray_rope(int64_t T, int64_t heads, int64_t D, const float* x, int64_t x_stride, const float* cos,
                const float* signed_sin, float* out) {
  const int64_t half = D / 2;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      const float* in = x + t * x_stride + h * D;
      const float *c = cos + t * D, *s = signed_sin + t * D;
      float* o = out + (t * heads + h) * D;
      for (int64_t d = 0; d < half; ++d) o[d] = in[d] * c[d] + in[d + half] * s[d];
      for (int64_t d = half; d < D; ++d) o[d] = in[d] * c[d] + in[d - half] * s[d];
    }
  return 0;
}

// RMSNorm of float32 rows, in the order of additions and roundings of torch's `F.rms_norm` (and of
// transformers' formula: pow, mean, + eps, rsqrt, two products): out = (x * rsqrt(sum(x^2) / H + eps))
// * weight, the sum as `torch_sum_squares<lanes>` adds it, rsqrt as 1 / sqrt. x, out [rows, H]; weight
// [H]. With `residual` (else null), x + residual is taken instead of x and written to `sum` (a residual
// connection and the norm after it). Returns 0; 1 for lanes other than 8 and 16 or H < lanes.
int moeray_rms_norm(int64_t rows, int64_t H, const float* x, const float* residual, const float* weight, double eps,
                    int64_t lanes, float* sum, float* out, int64_t num_threads) {
  if ((lanes != 8 && lanes != 16) || H < lanes) return 1;
#pragma omp parallel for num_threads(num_threads) if (rows * H >= (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * H;
    if (residual) {
      for (int64_t h = 0; h < H; ++h) sum[r * H + h] = row[h] + residual[r * H + h];
      row = sum + r * H;
    }
    const float sum = lanes == 8 ? torch_sum_squares<8>(row, H) : torch_sum_squares<16>(row, H);
    const float scale = 1.0f / std::sqrt(sum / float(H) + float(eps));
    for (int64_t h = 0; h < H; ++h) out[r * H + h] = row[h] * scale * weight[h];
  }
  return 0;
}


// groups [G, 3]: (expert, first sorted row, rows) of each group; the groups' rows lie in 0 .. num_rows.
// rows [num_rows]: the row of x of each sorted row, or null (x is sorted). out [num_rows, H] (the groups'
// rows are written, nothing else); scratch: float32 [num_rows, I] (+ [num_rows, H] for bf16).
// dtype: 0 float32, 1 bfloat16 (x, weights and out alike). x has x_rows rows, the weights E experts.
// b13 [E, 2I] and b2 [E, H] (x's dtype, or null), limit and alpha: see `Extras` (limit <= 0: plain SwiGLU).
// Returns 0; 1 for an unknown dtype; 2 for a group or row outside those bounds (nothing is computed).
int moeray_expert_ffn(int64_t dtype, int64_t num_groups, const int64_t* groups, int64_t num_rows, const int64_t* rows,
                      const void* x, int64_t x_rows, const void* w13, const void* w2, int64_t E, int64_t hidden,
                      int64_t inter, const void* b13, const void* b2, double limit, double alpha, float* scratch,
                      void* out, int64_t panel_rows, int64_t num_threads) {
  if (dtype != 0 && dtype != 1) return 1;
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t expert = groups[3 * g], first = groups[3 * g + 1], count = groups[3 * g + 2];
    if (expert < 0 || expert >= E || first < 0 || count < 0 || first + count > num_rows) return 2;
    for (int64_t j = first; j < first + count; ++j)
      if ((rows ? rows[j] : j) < 0 || (rows ? rows[j] : j) >= x_rows) return 2;
  }
  if (dtype == 0)
    run<float>(num_groups, groups, num_rows, rows, static_cast<const float*>(x), static_cast<const float*>(w13),
               static_cast<const float*>(w2), hidden, inter, scratch, static_cast<float*>(out),
               extras<float>(b13, b2, limit, alpha), panel_rows, int(num_threads));
  else
    run<bf16>(num_groups, groups, num_rows, rows, static_cast<const bf16*>(x), static_cast<const bf16*>(w13),
              static_cast<const bf16*>(w2), hidden, inter, scratch, static_cast<bf16*>(out),
              extras<bf16>(b13, b2, limit, alpha), panel_rows, int(num_threads));
  return 0;
}


// A whole MoE block for experts in this process: sort the T*K (token, expert) pairs by expert (stable
// counting sort), run the experts as above (x's rows read in place, no gathered copy), and sum each token's
// K results in top-k order (`combine`: the bits of kernels.moe.combine). topk_ids [T, K] int64;
// topk_weights [T, K], float32 (weights_dtype 0) or bf16 (1, float32 x only with float32 weights);
// x and out [T, H], dtype 0 float32 or 1 bf16 like moeray_expert_ffn. Each expert gets at most T rows (a
// token's K experts are distinct); b13, b2, limit, alpha as there. Returns 0; 1 for an unknown dtype pair;
// 2 if an id is outside 0 .. E-1.
int moeray_fused_moe(int64_t dtype, int64_t weights_dtype, int64_t T, int64_t K, const int64_t* topk_ids,
                     const void* topk_weights, const void* x, const void* w13, const void* w2, int64_t E,
                     int64_t hidden, int64_t inter, const void* b13, const void* b2, double limit, double alpha,
                     void* out, int64_t panel_rows, int64_t num_threads) {
  if ((dtype != 0 && dtype != 1) || (weights_dtype != 0 && weights_dtype != 1) || (dtype == 0 && weights_dtype == 1))
    return 1;
  const int64_t P = T * K;
  for (int64_t p = 0; p < P; ++p)
    if (topk_ids[p] < 0 || topk_ids[p] >= E) return 2;
  if (dtype == 0)
    fused<float>(T, K, topk_ids, static_cast<const float*>(topk_weights), static_cast<const float*>(x),
                 static_cast<const float*>(w13), static_cast<const float*>(w2), E, hidden, inter,
                 static_cast<float*>(out), extras<float>(b13, b2, limit, alpha), panel_rows, int(num_threads));
  else if (weights_dtype == 0)
    fused<bf16>(T, K, topk_ids, static_cast<const float*>(topk_weights), static_cast<const bf16*>(x),
                static_cast<const bf16*>(w13), static_cast<const bf16*>(w2), E, hidden, inter,
                static_cast<bf16*>(out), extras<bf16>(b13, b2, limit, alpha), panel_rows, int(num_threads));
  else
    fused<bf16>(T, K, topk_ids, static_cast<const bf16*>(topk_weights), static_cast<const bf16*>(x),
                static_cast<const bf16*>(w13), static_cast<const bf16*>(w2), E, hidden, inter,
                static_cast<bf16*>(out), extras<bf16>(b13, b2, limit, alpha), panel_rows, int(num_threads));
  return 0;
}


// Decode attention over a paged KV cache: one query row per sequence. q [B, nh, D], out [B, nh, Dv];
// k_cache [num_slots, nkv, D]; v_cache [num_slots, nkv, Dv] with element strides v_slot, v_head (a
// contiguous cache: nkv * Dv, Dv; MLA's values are the first Dv numbers of its key rows: v_cache ==
// k_cache, v_slot = nkv * D, v_head = D); slots [B, L] (the slot of each context position, padded); lens [B];
// a query sees positions max(0, len - window) .. len - 1 (window 0: all); sinks [nh] float32 (GPT-OSS, or
// null): head h's softmax also counts exp(sinks[h]), a logit with no value. Query heads h of kv head
// h / (nh / nkv) are taken together, so each key and value row is read once for all of them (once per
// part of them where a batch has fewer kv heads than threads). Scores,
// softmax and the weighted sum in float32 (exp(score - max), divided by the sum at the end, as SDPA
// does); dtype 0 float32, 1 bf16 (the output rounded once). Returns 0; 1 for an unknown dtype; 3 if nh is
// not a multiple of nkv; 4 for a length outside 0 .. L.
//
// The step's own keys and values can be written first (new_k non-null): row b of new_k / new_v, [nkv, D]
// each, goes to slot new_slots[b] of the caches (which hold num_slots); new_v is null where the values
// live in the keys (MLA), and only the keys are written. q, new_k and new_v rows are q_stride, k_stride and
// v_stride elements apart (the q and k heads of a fused projection, no copy). Returns 5 for a slot
// (new or of the context) outside 0 .. num_slots - 1 (nothing is written).
int moeray_decode_attention(int64_t dtype, int64_t B, int64_t nh, int64_t nkv, int64_t D, int64_t Dv, int64_t v_slot,
                            int64_t v_head, const void* q,
                            int64_t q_stride, void* k_cache, void* v_cache, int64_t num_slots, const void* new_k,
                            int64_t k_stride, const void* new_v, int64_t v_stride, const int64_t* new_slots,
                            const int64_t* slots, int64_t L, const int64_t* lens, double scale, int64_t window,
                            const float* sinks, void* out, int64_t num_threads) {
  if (dtype != 0 && dtype != 1) return 1;
  if (nkv <= 0 || nh % nkv) return 3;
  for (int64_t b = 0; b < B; ++b)
    if (lens[b] < 0 || lens[b] > L) return 4;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < lens[b]; ++i)
      if (slots[b * L + i] < 0 || slots[b * L + i] >= num_slots) return 5;
  if (new_k) {
    for (int64_t b = 0; b < B; ++b)
      if (new_slots[b] < 0 || new_slots[b] >= num_slots) return 5;
    const int64_t size = dtype == 0 ? 4 : 2, row = nkv * D * size, v_row = nkv * Dv * size;
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(static_cast<char*>(k_cache) + new_slots[b] * row, static_cast<const char*>(new_k) + b * k_stride * size, row);
      if (new_v)  // (null where the values live in the keys; a separate cache is contiguous: v_slot == nkv * Dv)
        std::memcpy(static_cast<char*>(v_cache) + new_slots[b] * v_row, static_cast<const char*>(new_v) + b * v_stride * size, v_row);
    }
  }
  // Work items: (sequence, kv head, part of its query heads). Fewer sequences x kv heads than threads
  // (one sequence of MLA, whose one kv head serves every query head) split the query heads into parts,
  // each reading the context for its own heads: a head's result does not depend on its part.
  if (B == 0 || nh == 0) return 0;  // (nothing to attend; the keys and values above are written)
  const bool parallel = B * nh * L * D >= (1 << 15);
  const int64_t group = nh / nkv, wanted = parallel ? (num_threads + B * nkv - 1) / (B * nkv) : 1;
  const int64_t part_heads = (group + std::min(group, wanted) - 1) / std::min(group, wanted);
  const int64_t parts = (group + part_heads - 1) / part_heads;  // (none left empty)
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
    std::vector<float> work;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * nkv * parts; ++item) {
      const int64_t b = item / (nkv * parts), kv = item / parts % nkv, h0 = kv * group + item % parts * part_heads;
      const int64_t heads = std::min(part_heads, (kv + 1) * group - h0), len = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0, at = (b * nh + h0) * Dv;
      const int64_t q_at = b * q_stride + h0 * D;
      const float* head_sinks = sinks ? sinks + h0 : nullptr;
      if (dtype == 0)
        attend_one(static_cast<const float*>(q) + q_at, static_cast<const float*>(k_cache), static_cast<const float*>(v_cache),
                   slots + b * L, first, len, nkv, kv, heads, D, Dv, v_slot, v_head, float(scale), head_sinks,
                   static_cast<float*>(out) + at, work);
      else
        attend_one(static_cast<const bf16*>(q) + q_at, static_cast<const bf16*>(k_cache), static_cast<const bf16*>(v_cache),
                   slots + b * L, first, len, nkv, kv, heads, D, Dv, v_slot, v_head, float(scale), head_sinks,
                   static_cast<bf16*>(out) + at, work);
    }
  }
  return 0;
}

// 1 if bf16 groups run on vdpbf16ps here (an AVX512-BF16 build: GEMMs from panel_rows rows), else 0.
int moeray_bf16_panels() { return BF16_PANELS; }

// Logits for a few rows: out [M, N] = x [M, K] @ w [N, K]^T, float32, w as checkpoints store the
// lm_head ([vocab, hidden], row-major); every weight row is streamed once per tile of panels (up to
// PANELS * PW rows of x). Each output is one chain of fused multiply-adds over k in order: the same bits
// for a row alone or in any batch.
// x is first laid out as panels of PW rows, [ceil(M / PW), K, PW], zero past row M. Returns 0.
int moeray_logits(int64_t M, int64_t K, int64_t N, const float* x, const float* w, float* out, int64_t num_threads) {
  const int64_t num_panels = (M + PW - 1) / PW;
  std::vector<float> panels(num_panels * K * PW);
  for (int64_t p = 0; p < num_panels; ++p) {
    const int n = int(std::min<int64_t>(PW, M - PW * p));
    const float* src[PW];
    for (int e = 0; e < n; ++e) src[e] = x + (PW * p + e) * K;
    to_panel(src, n, K, panels.data() + p * K * PW);
  }
  constexpr int64_t ITEM = 48;  // weight rows per work item: whole tiles of 6 and 8 (see tile_rows)
  const int64_t items = (N + ITEM - 1) / ITEM;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (items > 1 && M * N * K >= (1 << 16))
  for (int64_t item = 0; item < items; ++item) {
    const int64_t n0 = item * ITEM, count = std::min(ITEM, N - n0);
    panel_tiles(num_panels, [&](int64_t p, auto v) { logits_rows<decltype(v)::value>(w, K, panels.data(), p, M, n0, count, N, out); });
  }
  return 0;
}

}
