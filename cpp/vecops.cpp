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
// vector once, with float64 accumulation of every reduction.
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <thread>
#include <vector>

#include "vecops_common.h"

namespace hvd_abs {
namespace {

// Elements handled per block: small enough that the block of the vector and a few basis blocks
// stay in L1/L2 while we sweep the basis.
constexpr int64_t kBlock = 1024;

// The hot loops, one version per dtype. GCC's target_clones builds an AVX2 and a baseline version
// and picks at load time by CPU feature (the extension is compiled for baseline x86-64
// otherwise; GCC resolves "arch=haswell" by CPU model, "avx2" by feature). No FMA: both
// versions round the same way.
// Eight independent accumulators let the compiler vectorise the float64 reduction without
// -ffast-math.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HVD_ABS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define HVD_ABS_CLONES
#endif

#define HVD_ABS_DEFINE_KERNELS(T)                                                                   \
  HVD_ABS_CLONES double dot_##T(const T* __restrict a, const T* __restrict b, int64_t n) {         \
    double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                         \
    int64_t i = 0;                                                                                  \
    for (; i + 8 <= n; i += 8)                                                                      \
      for (int l = 0; l < 8; ++l) s[l] += static_cast<double>(a[i + l]) * static_cast<double>(b[i + l]); \
    double r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));                   \
    for (; i < n; ++i) r += static_cast<double>(a[i]) * static_cast<double>(b[i]);                  \
    return r;                                                                                       \
  }                                                                                                 \
  HVD_ABS_CLONES void axpy_acc_##T(double* __restrict acc, double c, const T* __restrict b, int64_t n) { \
    for (int64_t i = 0; i < n; ++i) acc[i] += c * static_cast<double>(b[i]);                        \
  }                                                                                                 \
  /* Four basis vectors per sweep of the block: acc is loaded and stored once per four, and the */ \
  /* sum is taken in the same order as four single axpys (bitwise the same result). */            \
  HVD_ABS_CLONES void axpy4_acc_##T(double* __restrict acc, const double* c, const T* __restrict b0, \
                                    const T* __restrict b1, const T* __restrict b2,                \
                                    const T* __restrict b3, int64_t n) {                           \
    const double c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];                                        \
    for (int64_t i = 0; i < n; ++i)                                                                 \
      acc[i] = (((acc[i] + c0 * static_cast<double>(b0[i])) + c1 * static_cast<double>(b1[i])) +    \
                c2 * static_cast<double>(b2[i])) + c3 * static_cast<double>(b3[i]);                 \
  }                                                                                                 \
  HVD_ABS_CLONES void axpy8_acc_##T(double* __restrict acc, const double* c, const T* const* b,      \
                                    int64_t off, int64_t n) {                                       \
    const double c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3], c4 = c[4], c5 = c[5], c6 = c[6], c7 = c[7]; \
    const T* __restrict b0 = b[0] + off; const T* __restrict b1 = b[1] + off;                       \
    const T* __restrict b2 = b[2] + off; const T* __restrict b3 = b[3] + off;                       \
    const T* __restrict b4 = b[4] + off; const T* __restrict b5 = b[5] + off;                       \
    const T* __restrict b6 = b[6] + off; const T* __restrict b7 = b[7] + off;                       \
    for (int64_t i = 0; i < n; ++i)                                                                 \
      acc[i] = (((((((acc[i] + c0 * static_cast<double>(b0[i])) + c1 * static_cast<double>(b1[i])) + \
                    c2 * static_cast<double>(b2[i])) + c3 * static_cast<double>(b3[i])) +           \
                  c4 * static_cast<double>(b4[i])) + c5 * static_cast<double>(b5[i])) +             \
                c6 * static_cast<double>(b6[i])) + c7 * static_cast<double>(b7[i]);                 \
  }                                                                                                 \
  /* <b_j, v> for four basis vectors against v already in float64 (converted once, not per dot); */ \
  /* per basis vector the lanes and their sum follow dot_##T, so the result is the same. */          \
  HVD_ABS_CLONES void dot4_##T(const T* __restrict b0, const T* __restrict b1, const T* __restrict b2, \
                               const T* __restrict b3, const double* __restrict v, int64_t n,       \
                               double* out) {                                                       \
    double s0[8] = {0, 0, 0, 0, 0, 0, 0, 0}, s1[8] = {0, 0, 0, 0, 0, 0, 0, 0};                      \
    double s2[8] = {0, 0, 0, 0, 0, 0, 0, 0}, s3[8] = {0, 0, 0, 0, 0, 0, 0, 0};                      \
    int64_t i = 0;                                                                                  \
    for (; i + 8 <= n; i += 8)                                                                      \
      for (int l = 0; l < 8; ++l) {                                                                 \
        const double x = v[i + l];                                                                  \
        s0[l] += static_cast<double>(b0[i + l]) * x;                                                \
        s1[l] += static_cast<double>(b1[i + l]) * x;                                                \
        s2[l] += static_cast<double>(b2[i + l]) * x;                                                \
        s3[l] += static_cast<double>(b3[i + l]) * x;                                                \
      }                                                                                             \
    double* ss[4] = {s0, s1, s2, s3};                                                               \
    const T* bs[4] = {b0, b1, b2, b3};                                                              \
    for (int j = 0; j < 4; ++j) {                                                                   \
      const double* q = ss[j];                                                                      \
      double r = ((q[0] + q[1]) + (q[2] + q[3])) + ((q[4] + q[5]) + (q[6] + q[7]));                 \
      for (int64_t t = i; t < n; ++t) r += static_cast<double>(bs[j][t]) * v[t];                    \
      out[j] = r;                                                                                   \
    }                                                                                               \
  }                                                                                                 \
  HVD_ABS_CLONES void load_acc_##T(double* __restrict acc, double beta, const T* __restrict x, int64_t n) { \
    if (beta == 0.0) {                                                                              \
      for (int64_t i = 0; i < n; ++i) acc[i] = 0.0; /* never read x: it may hold NaN/garbage */    \
    } else {                                                                                        \
      for (int64_t i = 0; i < n; ++i) acc[i] = beta * static_cast<double>(x[i]);                    \
    }                                                                                               \
  }                                                                                                 \
  HVD_ABS_CLONES double store_acc_##T(T* __restrict x, const double* __restrict acc, int64_t n) {   \
    double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                         \
    int64_t i = 0;                                                                                  \
    for (; i + 8 <= n; i += 8)                                                                      \
      for (int l = 0; l < 8; ++l) {                                                                 \
        T y = static_cast<T>(acc[i + l]);                                                           \
        x[i + l] = y;                                                                               \
        s[l] += static_cast<double>(y) * static_cast<double>(y);                                    \
      }                                                                                             \
    double r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));                   \
    for (; i < n; ++i) {                                                                            \
      T y = static_cast<T>(acc[i]);                                                                 \
      x[i] = y;                                                                                     \
      r += static_cast<double>(y) * static_cast<double>(y);                                         \
    }                                                                                               \
    return r;                                                                                       \
  }                                                                                                 \
  HVD_ABS_CLONES void scale_##T(T* __restrict x, double s, int64_t n) {                            \
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(static_cast<double>(x[i]) * s);           \
  }

HVD_ABS_DEFINE_KERNELS(float)
HVD_ABS_DEFINE_KERNELS(double)

inline double dot_k(const float* a, const float* b, int64_t n) { return dot_float(a, b, n); }
inline double dot_k(const double* a, const double* b, int64_t n) { return dot_double(a, b, n); }
inline void axpy_acc_k(double* acc, double c, const float* b, int64_t n) { axpy_acc_float(acc, c, b, n); }
inline void axpy_acc_k(double* acc, double c, const double* b, int64_t n) { axpy_acc_double(acc, c, b, n); }
inline void axpy4_acc_k(double* acc, const double* c, const float* const* b, int64_t off, int64_t n) {
  axpy4_acc_float(acc, c, b[0] + off, b[1] + off, b[2] + off, b[3] + off, n);
}
inline void axpy4_acc_k(double* acc, const double* c, const double* const* b, int64_t off, int64_t n) {
  axpy4_acc_double(acc, c, b[0] + off, b[1] + off, b[2] + off, b[3] + off, n);
}
inline void axpy8_acc_k(double* acc, const double* c, const float* const* b, int64_t off, int64_t n) {
  axpy8_acc_float(acc, c, b, off, n);
}
inline void axpy8_acc_k(double* acc, const double* c, const double* const* b, int64_t off, int64_t n) {
  axpy8_acc_double(acc, c, b, off, n);
}
inline void dot4_k(const float* const* b, int64_t off, const double* v, int64_t n, double* out) {
  dot4_float(b[0] + off, b[1] + off, b[2] + off, b[3] + off, v, n, out);
}
inline void dot4_k(const double* const* b, int64_t off, const double* v, int64_t n, double* out) {
  dot4_double(b[0] + off, b[1] + off, b[2] + off, b[3] + off, v, n, out);
}
inline void load_acc_k(double* acc, double beta, const float* x, int64_t n) { load_acc_float(acc, beta, x, n); }
inline void load_acc_k(double* acc, double beta, const double* x, int64_t n) { load_acc_double(acc, beta, x, n); }
inline double store_acc_k(float* x, const double* acc, int64_t n) { return store_acc_float(x, acc, n); }
inline double store_acc_k(double* x, const double* acc, int64_t n) { return store_acc_double(x, acc, n); }
inline void scale_k(float* x, double s, int64_t n) { scale_float(x, s, n); }
inline void scale_k(double* x, double s, int64_t n) { scale_double(x, s, n); }

// One fused pass over a vector v and a basis B (k vectors):
//   if coef:   v <- beta * v + sign * sum_j coef[j] * B_j          (written back to v)
//   if dots:   dots[j] += <B_j, v>   (on the value after the update)
//   always:    returns ||v||^2       (after the update)
// Every reduction is accumulated in float64; the update is computed in float64 and rounded once.
// Per block, the update takes eight (then four, then single) basis vectors per sweep of the
// float64 accumulator, and the dots four per sweep against v converted to float64 once: the same
// sums in the same order as one vector at a time, with a fraction of the accumulator traffic
// and conversions (a Lanczos step on ResNet-20, float32: 18.8 -> 12.2 ms here).
//
// The work is cut into blocks of kBlock elements of one tensor; each block writes its own partial
// sums, which are added in block order afterwards, so the result does not depend on the number
// of threads. Threads: std::thread over ranges of blocks (at::parallel_for would run serially
// here, since the extension is not compiled with -fopenmp), only when the pass is large enough
// to pay for starting them.
template <typename scalar_t>
double fused_pass(const std::vector<at::Tensor>& v, const std::vector<at::Tensor>& basis, int64_t k,
                  double beta, const double* coef, double sign, double* dots) {
  struct Block {
    int64_t t, s, m;
  };
  const int64_t T = static_cast<int64_t>(v.size());
  std::vector<scalar_t*> vp(T);
  std::vector<const scalar_t*> bp(k * T);
  std::vector<Block> blocks;
  int64_t numel = 0;
  for (int64_t t = 0; t < T; ++t) {
    vp[t] = v[t].data_ptr<scalar_t>();
    for (int64_t j = 0; j < k; ++j) bp[j * T + t] = basis[j * T + t].const_data_ptr<scalar_t>();
    const int64_t n = v[t].numel();
    for (int64_t s = 0; s < n; s += kBlock) blocks.push_back({t, s, std::min(kBlock, n - s)});
    numel += n;
  }
  const int64_t nb = static_cast<int64_t>(blocks.size());
  std::vector<double> part_dots(dots != nullptr ? nb * k : 0, 0.0), part_n2(nb, 0.0);
  const bool update = coef != nullptr || beta != 1.0;
  // Tensor-major basis pointers (bt[t * k + j]) and signed coefficients: four consecutive basis
  // vectors of one tensor are handled per sweep of a block (axpy4 / dot4), the rest one by one.
  std::vector<const scalar_t*> bt(k * T);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) bt[t * k + j] = bp[j * T + t];
  std::vector<double> sc(coef != nullptr ? k : 0);
  for (int64_t j = 0; j < static_cast<int64_t>(sc.size()); ++j) sc[j] = sign * coef[j];
  auto run = [&](int64_t b0, int64_t b1) {
    std::vector<double> acc(kBlock), vd(dots != nullptr ? kBlock : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const Block& blk = blocks[b];
      scalar_t* pv = vp[blk.t] + blk.s;
      const int64_t m = blk.m;
      const scalar_t* const* bj = bt.data() + blk.t * k;
      if (update) {
        load_acc_k(acc.data(), beta, pv, m);
        if (coef != nullptr) {
          int64_t j = 0;
          for (; j + 8 <= k; j += 8) axpy8_acc_k(acc.data(), sc.data() + j, bj + j, blk.s, m);
          for (; j + 4 <= k; j += 4) axpy4_acc_k(acc.data(), sc.data() + j, bj + j, blk.s, m);
          for (; j < k; ++j) axpy_acc_k(acc.data(), sc[j], bj[j] + blk.s, m);
        }
        part_n2[b] = store_acc_k(pv, acc.data(), m);
      } else {
        part_n2[b] = dot_k(pv, pv, m);
      }
      if (dots != nullptr) {
        load_acc_k(vd.data(), 1.0, pv, m);  // v (after the update, as stored) in float64, once
        int64_t j = 0;
        for (; j + 4 <= k; j += 4) dot4_k(bj + j, blk.s, vd.data(), m, &part_dots[b * k + j]);
        for (; j < k; ++j) part_dots[b * k + j] = dot_k(bj[j] + blk.s, pv, m);
      }
    }
  };
  int64_t nt = std::min<int64_t>(at::get_num_threads(), nb);
  if (numel * (k + 1) < (int64_t{1} << 20)) nt = 1;  // too small: a thread start costs ~20 us
  if (nt <= 1) {
    run(0, nb);
  } else {
    std::vector<std::thread> threads;
    for (int64_t i = 1; i < nt; ++i) threads.emplace_back(run, nb * i / nt, nb * (i + 1) / nt);
    run(0, nb / nt);
    for (auto& th : threads) th.join();
  }
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
  check_mutable("lincomb_", out);
  auto c = check_coeffs("lincomb_", coeffs, k).to(at::kCPU).contiguous();
  std::vector<at::Tensor> os(out.begin(), out.end());
  auto bs = contiguous_all(basis);
  const double n2 = fused_pass_dispatch(os, bs, k, beta, c.const_data_ptr<double>(), 1.0, nullptr);
  return at::scalar_tensor(std::sqrt(n2), f64_cpu());
}

std::tuple<at::Tensor, at::Tensor> orthonormalize_cpu(at::TensorList v, at::TensorList basis, int64_t passes) {
  const int64_t k = check_basis("orthonormalize_", basis, v);
  check_mutable("orthonormalize_", v);
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
  // <a, b> over two lists of equal shapes; accumulated in float64, returned in a's dtype.
  m.def("list_dot(Tensor[] a, Tensor[] b) -> Tensor");
  // [<B_j, v> for j < k] as float64, basis flat vector-major (k*T tensors).
  m.def("multi_dot(Tensor[] basis, Tensor[] v) -> Tensor");
  // out <- beta*out + sum_j coeffs[j]*B_j (coeffs: float64 [k]); returns ||out|| as float64.
  // beta == 0 never reads out. With k == 1 this is axpy-with-norm.
  m.def("lincomb_(Tensor(a!)[] out, Tensor[] basis, Tensor coeffs, float beta=1.0) -> Tensor");
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("with_cuda") =
#ifdef HVD_ABS_WITH_CUDA
      true;
#else
      false;
#endif
}
