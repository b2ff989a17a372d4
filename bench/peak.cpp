// This CPU's peak rate on the multiply-add instructions of the expert kernels (kernels/csrc/cpu_kernels.cpp),
// for bench/peak.py: each thread runs independent chains of one instruction on registers only, with no
// memory traffic and more chains than its latency times its throughput, so that no code built on that
// instruction can go faster. float32: the fused multiply-add on the widest vectors of the build (16 lanes on
// AVX-512, else 8), 2 FLOPs a lane; bf16: vdpbf16ps (AVX512-BF16; 16 lanes, 2 products and 2 adds each).
#include <omp.h>

#include <cstdint>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int LANES = 16, CHAINS = 24;  // 24 of the 32 vector registers
#else
constexpr int LANES = 8, CHAINS = 12;   // 12 of 16
#endif
typedef float vec __attribute__((vector_size(4 * LANES)));

inline vec fma(vec a, vec b, vec c) {  // a * b + c, rounded once (elsewhere: a multiply and an add)
#if defined(__AVX512F__)
  return vec(_mm512_fmadd_ps(__m512(a), __m512(b), __m512(c)));
#elif defined(__FMA__)
  return vec(_mm256_fmadd_ps(__m256(a), __m256(b), __m256(c)));
#else
  return a * b + c;
#endif
}

volatile float seed = 1e-7f;  // read at run time: the compiler cannot fold the chains
volatile float sink;

// FLOPs one thread did in `iterations` rounds of CHAINS instructions.
double run_chains(int64_t dtype, int64_t iterations) {
  const vec a = vec{} + seed, b = vec{} + 1.0f + seed;
  vec acc[CHAINS];
  for (int c = 0; c < CHAINS; ++c) acc[c] = vec{} + float(c);
  // (the chains unrolled into the round: GCC would otherwise interchange the loops and run one chain after
  // the other through memory, at the instruction's latency instead of its throughput)
  if (dtype == 0) {
    for (int64_t i = 0; i < iterations; ++i)
#pragma GCC unroll 32
      for (int c = 0; c < CHAINS; ++c) acc[c] = fma(a, b, acc[c]);
  } else {
#if defined(__AVX512BF16__)
    const __m512bh x = (__m512bh)_mm512_castps_si512(__m512(a)), y = (__m512bh)_mm512_castps_si512(__m512(b));
    for (int64_t i = 0; i < iterations; ++i)
#pragma GCC unroll 32
      for (int c = 0; c < CHAINS; ++c) acc[c] = vec(_mm512_dpbf16_ps(__m512(acc[c]), x, y));
#endif
  }
  float total = 0;
  for (int c = 0; c < CHAINS; ++c) total += acc[c][0];
  sink = total;
  return double(iterations) * CHAINS * LANES * (dtype == 0 ? 2 : 4);
}

}  // namespace

// GFLOP/s of num_threads threads, each running `iterations` rounds; dtype 0 float32, 1 bf16. -1 where the
// build has no bf16 dot-product instruction.
extern "C" double moeray_peak_gflops(int64_t dtype, int64_t iterations, int num_threads) {
#if !defined(__AVX512BF16__)
  if (dtype == 1) return -1;
#endif
  double flops = 0;
  const double start = omp_get_wtime();
#pragma omp parallel num_threads(num_threads) reduction(+ : flops)
  flops += run_chains(dtype, iterations);
  return flops / (omp_get_wtime() - start) / 1e9;
}
