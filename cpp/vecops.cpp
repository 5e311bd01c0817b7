// Krylov vector operations over lists of parameter-shaped tensors, registered once with
// TORCH_LIBRARY. CPU kernels live here; CUDA kernels in vecops_cuda.cu (HVD_ABS_WITH_CUDA).
//
// A "vector" is a list of T tensors (one per trainable parameter). A "basis" of k vectors is
// passed flat as k*T tensors, vector-major: basis[j*T + t] is tensor t of basis vector j. This
// keeps the schema to plain Tensor[] and lets every op read each basis vector once per pass.
//
// Why native: the Lanczos solver's vector phase (orthogonalise a new vector against the whole
// basis, twice) is memory-bound. torch._foreach_* needs k separate passes over the output and
// materialises k*n products for the dots; here each pass reads the basis once and writes the
// vector once. Reductions: per-lane runs in the input dtype, float64 across runs (see kRun);
// updates in the input dtype, as torch's paths do them.
// Python.h and the dispatcher alone, not torch/extension.h: the ops register at load, and the
// module holds one flag, so pybind11 and torch's C++ frontend only lengthened the build.
#include <Python.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "vecops_common.h"

namespace hvd_abs {
namespace {

// Elements handled per block: small enough that the block of the vector and a few basis blocks
// stay in L1/L2 while we sweep the basis.
constexpr int64_t kBlock = 1024;
// Elements per run of a reduction: products are summed per SIMD lane in the input dtype over one
// run (16 per lane for float32), then the run's lanes are added into float64 lanes. Sixteen
// float32 roundings keep each run's error near float32's own epsilon; float64 across runs keeps
// long tensors from drifting. (A full float64 reduction converts every element: 3.9 ms per
// sweep of a 30-vector ResNet-20 basis vs 0.9 ms this way, float32, 2 threads.)
constexpr int64_t kRun = 128;

// The hot loops, one version per dtype, written with GCC vector types (32 bytes: 8 floats or 4
// doubles) so that they vectorise without -ffast-math. GCC's target_clones builds an AVX2 and a
// baseline version (two 16-byte halves per vector) and picks at load time by CPU feature; both
// do the same operations in the same order, and setup.py compiles with -ffp-contract=off (no
// FMA), so both round the same way.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HVD_ABS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define HVD_ABS_CLONES
#endif

typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
// Unaligned vector load/store (tensor data is only element-aligned).
#define HVD_ABS_LOAD(VT, x, p) \
  VT x;                        \
  __builtin_memcpy(&x, (p), sizeof(VT))
#define HVD_ABS_STORE(p, x) __builtin_memcpy((p), &(x), sizeof(x))

// Pairwise sum of W float64 lanes: ((d0 + d1) + (d2 + d3)) + ...
inline double lane_sum(double* d, int w) {
  for (; w > 1; w /= 2)
    for (int l = 0; l < w / 2; ++l) d[l] = d[2 * l] + d[2 * l + 1];
  return d[0];
}

// T: element type; VT: its vector type of W lanes.
//   dot          <a, b> (runs of kRun per lane in T, float64 across runs; scalar tail in float64)
//   dot4         <b_j, v> for four basis vectors per sweep of v: per basis vector the same sums in
//                the same order as dot (products commute exactly), so grouping changes nothing
//   axpy8/4/1    v <- (((v + c0*b0) + c1*b1) + ...) in T, in this order for every element
//   scale        v <- v * s (computed in float64, rounded once)
#define HVD_ABS_DEFINE_KERNELS(T, VT, W)                                                          \
  HVD_ABS_CLONES double dot_##T(const T* a, const T* b, int64_t n) {                             \
    double d[W] = {};                                                                             \
    const int64_t nv = n - n % W;                                                                 \
    for (int64_t r = 0; r < nv; r += kRun) {                                                      \
      const int64_t e = std::min(nv, r + kRun);                                                   \
      VT s = {};                                                                                  \
      for (int64_t i = r; i < e; i += W) {                                                        \
        HVD_ABS_LOAD(VT, x, a + i);                                                               \
        HVD_ABS_LOAD(VT, y, b + i);                                                               \
        s += x * y;                                                                               \
      }                                                                                           \
      for (int l = 0; l < W; ++l) d[l] += static_cast<double>(s[l]);                              \
    }                                                                                             \
    double res = lane_sum(d, W);                                                                  \
    for (int64_t i = nv; i < n; ++i) res += static_cast<double>(a[i]) * static_cast<double>(b[i]); \
    return res;                                                                                   \
  }                                                                                               \
  HVD_ABS_CLONES void dot4_##T(const T* const* b, int64_t off, const T* v, int64_t n, double* out) { \
    const T *b0 = b[0] + off, *b1 = b[1] + off, *b2 = b[2] + off, *b3 = b[3] + off;               \
    double d[4][W] = {};                                                                          \
    const int64_t nv = n - n % W;                                                                 \
    for (int64_t r = 0; r < nv; r += kRun) {                                                      \
      const int64_t e = std::min(nv, r + kRun);                                                   \
      VT s0 = {}, s1 = {}, s2 = {}, s3 = {};                                                      \
      for (int64_t i = r; i < e; i += W) {                                                        \
        HVD_ABS_LOAD(VT, x, v + i);                                                               \
        HVD_ABS_LOAD(VT, y0, b0 + i);                                                             \
        HVD_ABS_LOAD(VT, y1, b1 + i);                                                             \
        HVD_ABS_LOAD(VT, y2, b2 + i);                                                             \
        HVD_ABS_LOAD(VT, y3, b3 + i);                                                             \
        s0 += y0 * x;                                                                             \
        s1 += y1 * x;                                                                             \
        s2 += y2 * x;                                                                             \
        s3 += y3 * x;                                                                             \
      }                                                                                           \
      for (int l = 0; l < W; ++l) {                                                               \
        d[0][l] += static_cast<double>(s0[l]);                                                    \
        d[1][l] += static_cast<double>(s1[l]);                                                    \
        d[2][l] += static_cast<double>(s2[l]);                                                    \
        d[3][l] += static_cast<double>(s3[l]);                                                    \
      }                                                                                           \
    }                                                                                             \
    const T* bs[4] = {b0, b1, b2, b3};                                                            \
    for (int j = 0; j < 4; ++j) {                                                                 \
      double res = lane_sum(d[j], W);                                                             \
      for (int64_t i = nv; i < n; ++i) res += static_cast<double>(bs[j][i]) * static_cast<double>(v[i]); \
      out[j] = res;                                                                               \
    }                                                                                             \
  }                                                                                               \
  HVD_ABS_CLONES void axpy8_##T(T* v, const T* c, const T* const* b, int64_t off, int64_t n) {    \
    const T *b0 = b[0] + off, *b1 = b[1] + off, *b2 = b[2] + off, *b3 = b[3] + off;               \
    const T *b4 = b[4] + off, *b5 = b[5] + off, *b6 = b[6] + off, *b7 = b[7] + off;               \
    const T c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3], c4 = c[4], c5 = c[5], c6 = c[6], c7 = c[7]; \
    const int64_t nv = n - n % W;                                                                 \
    for (int64_t i = 0; i < nv; i += W) {                                                         \
      HVD_ABS_LOAD(VT, x, v + i);                                                                 \
      HVD_ABS_LOAD(VT, y0, b0 + i);                                                               \
      HVD_ABS_LOAD(VT, y1, b1 + i);                                                               \
      HVD_ABS_LOAD(VT, y2, b2 + i);                                                               \
      HVD_ABS_LOAD(VT, y3, b3 + i);                                                               \
      HVD_ABS_LOAD(VT, y4, b4 + i);                                                               \
      HVD_ABS_LOAD(VT, y5, b5 + i);                                                               \
      HVD_ABS_LOAD(VT, y6, b6 + i);                                                               \
      HVD_ABS_LOAD(VT, y7, b7 + i);                                                               \
      x = (((((((x + c0 * y0) + c1 * y1) + c2 * y2) + c3 * y3) + c4 * y4) + c5 * y5) + c6 * y6) + c7 * y7; \
      HVD_ABS_STORE(v + i, x);                                                                    \
    }                                                                                             \
    for (int64_t i = nv; i < n; ++i)                                                              \
      v[i] = (((((((v[i] + c0 * b0[i]) + c1 * b1[i]) + c2 * b2[i]) + c3 * b3[i]) + c4 * b4[i]) +  \
               c5 * b5[i]) + c6 * b6[i]) + c7 * b7[i];                                            \
  }                                                                                               \
  HVD_ABS_CLONES void axpy4_##T(T* v, const T* c, const T* const* b, int64_t off, int64_t n) {    \
    const T *b0 = b[0] + off, *b1 = b[1] + off, *b2 = b[2] + off, *b3 = b[3] + off;               \
    const T c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];                                           \
    const int64_t nv = n - n % W;                                                                 \
    for (int64_t i = 0; i < nv; i += W) {                                                         \
      HVD_ABS_LOAD(VT, x, v + i);                                                                 \
      HVD_ABS_LOAD(VT, y0, b0 + i);                                                               \
      HVD_ABS_LOAD(VT, y1, b1 + i);                                                               \
      HVD_ABS_LOAD(VT, y2, b2 + i);                                                               \
      HVD_ABS_LOAD(VT, y3, b3 + i);                                                               \
      x = (((x + c0 * y0) + c1 * y1) + c2 * y2) + c3 * y3;                                        \
      HVD_ABS_STORE(v + i, x);                                                                    \
    }                                                                                             \
    for (int64_t i = nv; i < n; ++i) v[i] = (((v[i] + c0 * b0[i]) + c1 * b1[i]) + c2 * b2[i]) + c3 * b3[i]; \
  }                                                                                               \
  HVD_ABS_CLONES void axpy1_##T(T* v, T c, const T* b, int64_t n) {                               \
    const int64_t nv = n - n % W;                                                                 \
    for (int64_t i = 0; i < nv; i += W) {                                                         \
      HVD_ABS_LOAD(VT, x, v + i);                                                                 \
      HVD_ABS_LOAD(VT, y, b + i);                                                                 \
      x = x + c * y;                                                                              \
      HVD_ABS_STORE(v + i, x);                                                                    \
    }                                                                                             \
    for (int64_t i = nv; i < n; ++i) v[i] = v[i] + c * b[i];                                      \
  }                                                                                               \
  HVD_ABS_CLONES void scale_##T(T* x, double s, int64_t n) {                                      \
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(static_cast<double>(x[i]) * s);         \
  }

HVD_ABS_DEFINE_KERNELS(float, f32x8, 8)
HVD_ABS_DEFINE_KERNELS(double, f64x4, 4)

// Overloads, so that the templated pass below picks the kernels by element type.
#define HVD_ABS_OVERLOADS(T)                                                                              \
  inline double dot_k(const T* a, const T* b, int64_t n) { return dot_##T(a, b, n); }                    \
  inline void dot4_k(const T* const* b, int64_t off, const T* v, int64_t n, double* out) {               \
    dot4_##T(b, off, v, n, out);                                                                          \
  }                                                                                                       \
  inline void axpy8_k(T* v, const T* c, const T* const* b, int64_t off, int64_t n) { axpy8_##T(v, c, b, off, n); } \
  inline void axpy4_k(T* v, const T* c, const T* const* b, int64_t off, int64_t n) { axpy4_##T(v, c, b, off, n); } \
  inline void axpy1_k(T* v, T c, const T* b, int64_t n) { axpy1_##T(v, c, b, n); }                       \
  inline void scale_k(T* x, double s, int64_t n) { scale_##T(x, s, n); }
HVD_ABS_OVERLOADS(float)
HVD_ABS_OVERLOADS(double)

// One fused pass over a vector v and a basis B (k vectors):
//   if coef:   v <- beta * v + sign * sum_j coef[j] * B_j          (in place, in v's dtype)
//   if dots:   dots[j] += <B_j, v>   (on the value after the update)
//   always:    returns ||v||^2       (after the update)
// Reductions as in dot_##T (float64 across runs). The update is done in v's dtype, eight basis
// vectors per sweep of a block of v (then four, then one), like the torch paths' axpys but with
// one load and store of v per eight. The dots take four basis vectors per sweep of the block,
// while it is still in L1. A Lanczos step on ResNet-20 (30 basis vectors, float32, 2 threads):
// 12.2 ms with float64 accumulators and own threads, 9.2 ms with these kernels, ~6 ms on
// torch's pool (benchmarks/bench_hessian.py, vector_phase).
//
// The work is cut into blocks of kBlock elements of one tensor; each block writes its own partial
// sums, which are added in block order afterwards, so the result does not depend on the number
// of threads. Threads: at::parallel_for, i.e. torch's own OpenMP pool (setup.py compiles with
// -fopenmp when torch uses OpenMP). Own std::threads lost ~1.7 ms of a 9 ms Lanczos step on 2
// cores: after any parallel torch op (the Hessian product before it) OpenMP's idle workers keep
// spinning for about a millisecond on the cores the new threads need.
template <typename scalar_t>
double fused_pass(const std::vector<at::Tensor>& v, const std::vector<at::Tensor>& basis, int64_t k,
                  double beta, const double* coef, double sign, double* dots) {
  struct Block {
    int64_t t, s, m;
  };
  const int64_t T = static_cast<int64_t>(v.size());
  std::vector<scalar_t*> vp(T);
  // Tensor-major basis pointers: bt[t * k + j] is tensor t of basis vector j, so that the basis
  // vectors of one tensor are consecutive for the grouped kernels.
  std::vector<const scalar_t*> bt(k * T);
  std::vector<Block> blocks;
  int64_t numel = 0;
  for (int64_t t = 0; t < T; ++t) {
    vp[t] = v[t].data_ptr<scalar_t>();
    for (int64_t j = 0; j < k; ++j) bt[t * k + j] = basis[j * T + t].const_data_ptr<scalar_t>();
    const int64_t n = v[t].numel();
    for (int64_t s = 0; s < n; s += kBlock) blocks.push_back({t, s, std::min(kBlock, n - s)});
    numel += n;
  }
  const int64_t nb = static_cast<int64_t>(blocks.size());
  std::vector<double> part_dots(dots != nullptr ? nb * k : 0, 0.0), part_n2(nb, 0.0);
  std::vector<scalar_t> sc(coef != nullptr ? k : 0);  // signed coefficients in v's dtype
  for (int64_t j = 0; j < static_cast<int64_t>(sc.size()); ++j) sc[j] = static_cast<scalar_t>(sign * coef[j]);
  auto run = [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const Block& blk = blocks[b];
      scalar_t* pv = vp[blk.t] + blk.s;
      const int64_t m = blk.m;
      const scalar_t* const* bj = bt.data() + blk.t * k;
      if (beta == 0.0) {
        std::fill(pv, pv + m, scalar_t(0));  // never read v: it may hold NaN/garbage
      } else if (beta != 1.0) {
        scale_k(pv, beta, m);
      }
      if (coef != nullptr) {
        int64_t j = 0;
        for (; j + 8 <= k; j += 8) axpy8_k(pv, sc.data() + j, bj + j, blk.s, m);
        for (; j + 4 <= k; j += 4) axpy4_k(pv, sc.data() + j, bj + j, blk.s, m);
        for (; j < k; ++j) axpy1_k(pv, sc[j], bj[j] + blk.s, m);
      }
      part_n2[b] = dot_k(pv, pv, m);
      if (dots != nullptr) {
        int64_t j = 0;
        for (; j + 4 <= k; j += 4) dot4_k(bj + j, blk.s, pv, m, &part_dots[b * k + j]);
        for (; j < k; ++j) part_dots[b * k + j] = dot_k(bj[j] + blk.s, pv, m);
      }
    }
  };
  // Small passes run on the calling thread: waking the pool costs more than they take.
  const int64_t grain = numel * (k + 1) < (int64_t{1} << 20) ? std::max<int64_t>(nb, 1) : 1;
  at::parallel_for(0, nb, grain, run);
  double norm2 = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    norm2 += part_n2[b];
    if (dots != nullptr)
      for (int64_t j = 0; j < k; ++j) dots[j] += part_dots[b * k + j];
  }
  return norm2;
}

double fused_pass_dispatch(const std::vector<at::Tensor>& v, const std::vector<at::Tensor>& basis, int64_t k,
                           double beta, const double* coef, double sign, double* dots) {
  if (v.empty()) return 0.0;
  double r = 0.0;
  AT_DISPATCH_FLOATING_TYPES(v[0].scalar_type(), "hvd_abs_fused_pass", [&] {
    r = fused_pass<scalar_t>(v, basis, k, beta, coef, sign, dots);
  });
  return r;
}

std::vector<at::Tensor> contiguous_all(at::TensorList xs) {
  std::vector<at::Tensor> out;
  out.reserve(xs.size());
  for (const auto& x : xs) out.push_back(x.contiguous());
  return out;
}

at::TensorOptions f64_cpu() { return at::TensorOptions().dtype(at::kDouble).device(at::kCPU); }

}  // namespace

at::Tensor multi_dot_cpu(at::TensorList basis, at::TensorList v) {
  const int64_t k = check_basis("multi_dot", basis, v);
  auto out = at::zeros({k}, f64_cpu());
  auto vs = contiguous_all(v);
  auto bs = contiguous_all(basis);
  fused_pass_dispatch(vs, bs, k, 1.0, nullptr, 1.0, out.data_ptr<double>());
  return out;
}

at::Tensor list_dot_cpu(at::TensorList a, at::TensorList b) {
  TORCH_CHECK(a.size() == b.size(), "list_dot: lists differ in length (", a.size(), " vs ", b.size(), ")");
  auto dtype = a.empty() ? at::kDouble : a[0].scalar_type();
  if (a.empty()) return at::zeros({}, f64_cpu());
  return multi_dot_cpu(a, b).reshape({}).to(dtype);
}

at::Tensor lincomb_cpu(at::TensorList out, at::TensorList basis, const at::Tensor& coeffs, double beta) {
  const int64_t k = check_basis("lincomb_", basis, out);
  check_mutable("lincomb_", out, basis);
  auto c = check_coeffs("lincomb_", coeffs, k).to(at::kCPU).contiguous();
  std::vector<at::Tensor> os(out.begin(), out.end());
  auto bs = contiguous_all(basis);
  const double n2 = fused_pass_dispatch(os, bs, k, beta, c.const_data_ptr<double>(), 1.0, nullptr);
  return at::scalar_tensor(std::sqrt(n2), f64_cpu());
}

std::tuple<at::Tensor, at::Tensor> orthonormalize_cpu(at::TensorList v, at::TensorList basis, int64_t passes) {
  const int64_t k = check_basis("orthonormalize_", basis, v);
  check_mutable("orthonormalize_", v, basis);
  TORCH_CHECK(passes >= 1, "orthonormalize_: passes must be >= 1 (2 = classical Gram-Schmidt twice), got ", passes);
  std::vector<at::Tensor> vs(v.begin(), v.end());
  auto bs = contiguous_all(basis);
  auto total = at::zeros({k}, f64_cpu());
  std::vector<double> h(k, 0.0), h_next(k, 0.0);
  double* tot = total.data_ptr<double>();
  double norm2 = 0.0;
  if (k == 0) {
    norm2 = fused_pass_dispatch(vs, bs, 0, 1.0, nullptr, 1.0, nullptr);
  } else {
    // Pass 0: h = B^T v. Pass p: v -= B h and, fused into the same sweep, h' = B^T v (except on
    // the last pass, which only needs ||v||).
    fused_pass_dispatch(vs, bs, k, 1.0, nullptr, 1.0, h.data());
    for (int64_t p = 0; p < passes; ++p) {
      for (int64_t j = 0; j < k; ++j) tot[j] += h[j];
      const bool last = p + 1 == passes;
      std::fill(h_next.begin(), h_next.end(), 0.0);
      norm2 = fused_pass_dispatch(vs, bs, k, 1.0, h.data(), -1.0, last ? nullptr : h_next.data());
      std::swap(h, h_next);
    }
  }
  const double norm = std::sqrt(norm2);
  // An exactly zero vector is left as it is: the caller sees norm == 0 (Krylov breakdown).
  if (norm > 0.0) {
    for (auto& x : vs) {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hvd_abs_scale", [&] {
        scale_k(x.data_ptr<scalar_t>(), 1.0 / norm, x.numel());
      });
    }
  }
  return {total, at::scalar_tensor(norm, f64_cpu())};
}

at::Tensor flatten_cpu(at::TensorList xs) {
  TORCH_CHECK(!xs.empty(), "flatten: needs at least one tensor");
  int64_t n = 0;
  for (const auto& x : xs) {
    TORCH_CHECK(x.scalar_type() == xs[0].scalar_type(), "flatten: all tensors must share one dtype");
    n += x.numel();
  }
  auto out = at::empty({n}, xs[0].options().memory_format(at::MemoryFormat::Contiguous));
  int64_t off = 0;
  for (const auto& x : xs) {
    out.narrow(0, off, x.numel()).copy_(x.reshape(-1));
    off += x.numel();
  }
  return out;
}

std::vector<at::Tensor> unflatten_cpu(const at::Tensor& flat, at::TensorList like) {
  TORCH_CHECK(flat.dim() == 1, "unflatten: flat must be 1-D, got ", flat.dim(), "-D");
  int64_t n = 0;
  for (const auto& x : like) n += x.numel();
  TORCH_CHECK(flat.numel() == n, "unflatten: flat has ", flat.numel(), " elements, `like` needs ", n);
  std::vector<at::Tensor> out;
  out.reserve(like.size());
  int64_t off = 0;
  for (const auto& x : like) {
    out.push_back(flat.narrow(0, off, x.numel()).reshape(x.sizes()).clone(at::MemoryFormat::Contiguous));
    off += x.numel();
  }
  return out;
}

}  // namespace hvd_abs

TORCH_LIBRARY(hvd_abs, m) {
  // <a, b> over two lists of equal shapes; summed in float64 (across short runs), returned in a's dtype.
  m.def("list_dot(Tensor[] a, Tensor[] b) -> Tensor");
  // [<B_j, v> for j < k] as float64, basis flat vector-major (k*T tensors).
  m.def("multi_dot(Tensor[] basis, Tensor[] v) -> Tensor");
  // out <- beta*out + sum_j coeffs[j]*B_j (coeffs: float64 [k]); returns ||out|| as float64.
  // beta == 0 never reads out. With k == 1 this is axpy-with-norm.
  m.def("lincomb_(Tensor(a!)[] out, Tensor[] basis, Tensor coeffs, float beta=1.0) -> Tensor");
  // The in-place ops reject an output that shares memory with the basis or with itself.
  // Classical Gram-Schmidt (`passes` times) of v against an orthonormal basis, then v /= ||v||.
  // Returns (B^T v summed over passes as float64 [k], ||v|| before the division as float64).
  m.def("orthonormalize_(Tensor(a!)[] v, Tensor[] basis, int passes=2) -> (Tensor, Tensor)");
  // Concatenation of the tensors' elements into one new 1-D tensor, and its inverse (copies).
  m.def("flatten(Tensor[] xs) -> Tensor");
  m.def("unflatten(Tensor flat, Tensor[] like) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(hvd_abs, CPU, m) {
  m.impl("list_dot", &hvd_abs::list_dot_cpu);
  m.impl("multi_dot", &hvd_abs::multi_dot_cpu);
  m.impl("lincomb_", &hvd_abs::lincomb_cpu);
  m.impl("orthonormalize_", &hvd_abs::orthonormalize_cpu);
  m.impl("flatten", &hvd_abs::flatten_cpu);
  m.impl("unflatten", &hvd_abs::unflatten_cpu);
}

#define HVD_ABS_CAT(a, b) a##b
#define HVD_ABS_INIT(name) HVD_ABS_CAT(PyInit_, name)
#define HVD_ABS_STR2(name) #name
#define HVD_ABS_STR(name) HVD_ABS_STR2(name)

PyMODINIT_FUNC HVD_ABS_INIT(TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, HVD_ABS_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&def);
#ifdef HVD_ABS_WITH_CUDA
  PyObject* with_cuda = Py_True;
#else
  PyObject* with_cuda = Py_False;
#endif
  if (module != nullptr && PyModule_AddObjectRef(module, "with_cuda", with_cuda) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
