// CUDA kernels for the ops declared in vecops.cpp. Compiled only when torch is a CUDA build and
// nvcc is present (setup.py defines HVD_ABS_WITH_CUDA).
//
// Every op is one multi-tensor launch (plus, for orthonormalize_, one launch per Gram-Schmidt
// pass and one scaling launch): the host builds a small table of tensor pointers, sizes and
// (tensor, start) chunks, copies it to the device once, and each CUDA block handles one chunk of
// one tensor for all k basis vectors. Reductions are float64: warp shuffles, then shared memory,
// then one atomicAdd per block and basis vector. Nothing syncs with the host.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "vecops_common.h"

namespace hvd_abs {
namespace {

constexpr int kThreads = 256;
constexpr int kElems = 4;  // per thread: a chunk is kThreads * kElems elements
constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kElems;
constexpr int kMaxBasis = 512;  // shared memory holds (k+1) * 8 warps doubles

// Device-side table: [T tensor pointers of v][k*T basis pointers][T sizes][2*C chunks]
// [T offsets, only for the copy kernels].
struct Meta {
  at::Tensor table;
  int64_t chunks = 0;
};

Meta build_meta(at::TensorList v, const std::vector<at::Tensor>& basis, int64_t k, bool offsets) {
  const int64_t T = static_cast<int64_t>(v.size());
  std::vector<int64_t> h;
  h.reserve((k + 2) * T + 64);
  for (int64_t t = 0; t < T; ++t) h.push_back(reinterpret_cast<int64_t>(v[t].data_ptr()));
  for (int64_t i = 0; i < k * T; ++i) h.push_back(reinterpret_cast<int64_t>(basis[i].const_data_ptr()));
  for (int64_t t = 0; t < T; ++t) h.push_back(v[t].numel());
  Meta m;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t s = 0; s < v[t].numel(); s += kChunk) {
      h.push_back(t);
      h.push_back(s);
      ++m.chunks;
    }
  }
  if (offsets) {
    int64_t off = 0;
    for (int64_t t = 0; t < T; ++t) {
      h.push_back(off);
      off += v[t].numel();
    }
  }
  auto pinned = at::empty({static_cast<int64_t>(h.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(pinned.data_ptr<int64_t>(), h.data(), h.size() * sizeof(int64_t));
  // non_blocking from pinned memory: the caching host allocator keeps `pinned` alive until the
  // copy on the current stream is done.
  m.table = pinned.to(v[0].device(), /*non_blocking=*/true);
  return m;
}

__device__ __forceinline__ double warp_sum(double x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  return x;
}

// v <- beta*v + sign*sum_j coef[j]*B_j (if coef or beta != 1); dots[j] += <B_j, v>; norm2 += ||v||^2.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) fused_pass_kernel(const int64_t* __restrict__ meta, int64_t T, int k,
                                                              double beta, const double* __restrict__ coef,
                                                              double sign, double* __restrict__ dots,
                                                              double* __restrict__ norm2) {
  extern __shared__ double smem[];  // (k + 1) * nwarps
  const int nwarps = blockDim.x / 32;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t* sizes = meta + (static_cast<int64_t>(k) + 1) * T;
  const int64_t* chunks = sizes + T;
  const int64_t t = chunks[2 * blockIdx.x];
  const int64_t start = chunks[2 * blockIdx.x + 1];
  const int64_t n = sizes[t];
  scalar_t* v = reinterpret_cast<scalar_t*>(meta[t]);

  double x[kElems];
  int64_t idx[kElems];
#pragma unroll
  for (int e = 0; e < kElems; ++e) {
    idx[e] = start + static_cast<int64_t>(e) * blockDim.x + threadIdx.x;  // coalesced
    x[e] = idx[e] < n ? static_cast<double>(v[idx[e]]) : 0.0;
  }
  if (coef != nullptr || beta != 1.0) {
#pragma unroll
    for (int e = 0; e < kElems; ++e) x[e] = beta == 0.0 ? 0.0 : beta * x[e];
    if (coef != nullptr) {
      for (int j = 0; j < k; ++j) {
        const scalar_t* b = reinterpret_cast<const scalar_t*>(meta[T + static_cast<int64_t>(j) * T + t]);
        const double c = sign * coef[j];
#pragma unroll
        for (int e = 0; e < kElems; ++e)
          if (idx[e] < n) x[e] += c * static_cast<double>(b[idx[e]]);
      }
    }
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      if (idx[e] < n) {
        const scalar_t y = static_cast<scalar_t>(x[e]);
        v[idx[e]] = y;
        x[e] = static_cast<double>(y);  // reduce what was stored, as the CPU kernel does
      }
    }
  }
  double s = 0.0;
#pragma unroll
  for (int e = 0; e < kElems; ++e) s += x[e] * x[e];
  s = warp_sum(s);
  if (lane == 0) smem[static_cast<int64_t>(k) * nwarps + warp] = s;
  if (dots != nullptr) {
    for (int j = 0; j < k; ++j) {
      const scalar_t* b = reinterpret_cast<const scalar_t*>(meta[T + static_cast<int64_t>(j) * T + t]);
      double p = 0.0;
#pragma unroll
      for (int e = 0; e < kElems; ++e)
        if (idx[e] < n) p += static_cast<double>(b[idx[e]]) * x[e];
      p = warp_sum(p);
      if (lane == 0) smem[j * nwarps + warp] = p;
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j <= k; j += blockDim.x) {
    if (j < k && dots == nullptr) continue;
    double acc = 0.0;
    for (int w = 0; w < nwarps; ++w) acc += smem[j * nwarps + w];
    atomicAdd(j < k ? dots + j : norm2, acc);
  }
}

// v /= sqrt(norm2) unless norm2 == 0 (a zero vector is left as it is: Krylov breakdown).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) scale_kernel(const int64_t* __restrict__ meta, int64_t T, int k,
                                                         const double* __restrict__ norm2) {
  const double n2 = *norm2;
  if (!(n2 > 0.0)) return;
  const double inv = 1.0 / sqrt(n2);
  const int64_t* sizes = meta + (static_cast<int64_t>(k) + 1) * T;
  const int64_t* chunks = sizes + T;
  const int64_t t = chunks[2 * blockIdx.x];
  const int64_t start = chunks[2 * blockIdx.x + 1];
  scalar_t* v = reinterpret_cast<scalar_t*>(meta[t]);
#pragma unroll
  for (int e = 0; e < kElems; ++e) {
    const int64_t i = start + static_cast<int64_t>(e) * blockDim.x + threadIdx.x;
    if (i < sizes[t]) v[i] = static_cast<scalar_t>(static_cast<double>(v[i]) * inv);
  }
}

// Segmented copy between the list (table's v pointers) and one flat buffer.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) copy_kernel(const int64_t* __restrict__ meta, int64_t T,
                                                        int64_t nchunks, scalar_t* __restrict__ flat,
                                                        bool to_flat) {
  const int64_t* sizes = meta + T;
  const int64_t* chunks = sizes + T;
  const int64_t* offsets = chunks + 2 * nchunks;
  const int64_t t = chunks[2 * blockIdx.x];
  const int64_t start = chunks[2 * blockIdx.x + 1];
  scalar_t* x = reinterpret_cast<scalar_t*>(meta[t]);
#pragma unroll
  for (int e = 0; e < kElems; ++e) {
    const int64_t i = start + static_cast<int64_t>(e) * blockDim.x + threadIdx.x;
    if (i < sizes[t]) {
      if (to_flat) flat[offsets[t] + i] = x[i];
      else x[i] = flat[offsets[t] + i];
    }
  }
}

void launch_pass(const Meta& m, at::TensorList v, int64_t k, double beta, const at::Tensor* coef, double sign,
                 at::Tensor* dots, const at::Tensor& norm2) {
  if (m.chunks == 0) return;
  const int64_t T = static_cast<int64_t>(v.size());
  const size_t smem = static_cast<size_t>(k + 1) * (kThreads / 32) * sizeof(double);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(v[0].scalar_type(), "hvd_abs_fused_pass_cuda", [&] {
    fused_pass_kernel<scalar_t><<<static_cast<unsigned>(m.chunks), kThreads, smem, stream>>>(
        m.table.const_data_ptr<int64_t>(), T, static_cast<int>(k), beta,
        coef ? coef->const_data_ptr<double>() : nullptr, sign, dots ? dots->data_ptr<double>() : nullptr,
        norm2.data_ptr<double>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<at::Tensor> contiguous_all(at::TensorList xs) {
  std::vector<at::Tensor> out;
  out.reserve(xs.size());
  for (const auto& x : xs) out.push_back(x.contiguous());
  return out;
}

int64_t check_cuda(const char* op, at::TensorList basis, at::TensorList v) {
  const int64_t k = check_basis(op, basis, v);
  // The dispatcher comes here when any argument is on CUDA (e.g. only the coefficients).
  TORCH_CHECK(v.empty() || v[0].is_cuda(), op, ": the vectors are on ", v.empty() ? "" : v[0].device().str(),
              " but another argument is on CUDA: pass the vectors, basis and coefficients on one device");
  TORCH_CHECK(k <= kMaxBasis, op, ": at most ", kMaxBasis, " basis vectors on CUDA, got ", k,
              "; restart the Krylov method earlier");
  return k;
}

}  // namespace

at::Tensor multi_dot_cuda(at::TensorList basis, at::TensorList v) {
  const int64_t k = check_cuda("multi_dot", basis, v);
  TORCH_CHECK(!v.empty(), "multi_dot: v is empty");
  const c10::cuda::CUDAGuard guard(v[0].device());
  auto opts = v[0].options().dtype(at::kDouble);
  auto dots = at::zeros({k}, opts);
  auto norm2 = at::zeros({}, opts);
  auto vs = contiguous_all(v);
  auto bs = contiguous_all(basis);
  Meta m = build_meta(vs, bs, k, false);
  launch_pass(m, vs, k, 1.0, nullptr, 1.0, &dots, norm2);
  return dots;
}

at::Tensor list_dot_cuda(at::TensorList a, at::TensorList b) {
  TORCH_CHECK(a.size() == b.size(), "list_dot: lists differ in length (", a.size(), " vs ", b.size(), ")");
  TORCH_CHECK(!a.empty(), "list_dot: empty lists on CUDA");
  return multi_dot_cuda(a, b).reshape({}).to(a[0].scalar_type());
}

at::Tensor lincomb_cuda(at::TensorList out, at::TensorList basis, const at::Tensor& coeffs, double beta) {
  const int64_t k = check_cuda("lincomb_", basis, out);
  check_mutable("lincomb_", out, basis);
  TORCH_CHECK(!out.empty(), "lincomb_: out is empty");
  const c10::cuda::CUDAGuard guard(out[0].device());
  auto c = check_coeffs("lincomb_", coeffs, k).to(out[0].device()).contiguous();
  auto norm2 = at::zeros({}, out[0].options().dtype(at::kDouble));
  auto bs = contiguous_all(basis);
  Meta m = build_meta(out, bs, k, false);
  launch_pass(m, out, k, beta, &c, 1.0, nullptr, norm2);
  return norm2.sqrt();
}

std::tuple<at::Tensor, at::Tensor> orthonormalize_cuda(at::TensorList v, at::TensorList basis, int64_t passes) {
  const int64_t k = check_cuda("orthonormalize_", basis, v);
  check_mutable("orthonormalize_", v, basis);
  TORCH_CHECK(passes >= 1, "orthonormalize_: passes must be >= 1 (2 = classical Gram-Schmidt twice), got ", passes);
  TORCH_CHECK(!v.empty(), "orthonormalize_: v is empty");
  const c10::cuda::CUDAGuard guard(v[0].device());
  auto opts = v[0].options().dtype(at::kDouble);
  auto bs = contiguous_all(basis);
  Meta m = build_meta(v, bs, k, false);
  auto total = at::zeros({k}, opts);
  auto norm2 = at::zeros({}, opts);
  if (k == 0) {
    launch_pass(m, v, 0, 1.0, nullptr, 1.0, nullptr, norm2);
  } else {
    auto h = at::zeros({k}, opts);
    auto scratch = at::zeros({}, opts);
    launch_pass(m, v, k, 1.0, nullptr, 1.0, &h, scratch);
    for (int64_t p = 0; p < passes; ++p) {
      total.add_(h);
      const bool last = p + 1 == passes;
      auto h_next = at::zeros({k}, opts);
      if (last) {
        launch_pass(m, v, k, 1.0, &h, -1.0, nullptr, norm2);
      } else {
        scratch.zero_();
        launch_pass(m, v, k, 1.0, &h, -1.0, &h_next, scratch);
      }
      h = h_next;
    }
  }
  if (m.chunks > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(v[0].scalar_type(), "hvd_abs_scale_cuda", [&] {
      scale_kernel<scalar_t><<<static_cast<unsigned>(m.chunks), kThreads, 0, stream>>>(
          m.table.const_data_ptr<int64_t>(), static_cast<int64_t>(v.size()), static_cast<int>(k),
          norm2.const_data_ptr<double>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {total, norm2.sqrt()};
}

at::Tensor flatten_cuda(at::TensorList xs) {
  TORCH_CHECK(!xs.empty(), "flatten: needs at least one tensor");
  const c10::cuda::CUDAGuard guard(xs[0].device());
  int64_t n = 0;
  for (const auto& x : xs) {
    TORCH_CHECK(x.scalar_type() == xs[0].scalar_type() && x.device() == xs[0].device(),
                "flatten: all tensors must share one dtype and device");
    n += x.numel();
  }
  auto out = at::empty({n}, xs[0].options().memory_format(at::MemoryFormat::Contiguous));
  auto cs = contiguous_all(xs);
  Meta m = build_meta(cs, {}, 0, true);
  if (m.chunks == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "hvd_abs_flatten_cuda", [&] {
    copy_kernel<scalar_t><<<static_cast<unsigned>(m.chunks), kThreads, 0, stream>>>(
        m.table.const_data_ptr<int64_t>(), static_cast<int64_t>(cs.size()), m.chunks, out.data_ptr<scalar_t>(), true);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<at::Tensor> unflatten_cuda(const at::Tensor& flat, at::TensorList like) {
  if (!flat.is_cuda()) return unflatten_cpu(flat, like);  // outputs follow flat, as on the CPU
  TORCH_CHECK(flat.dim() == 1, "unflatten: flat must be 1-D, got ", flat.dim(), "-D");
  const c10::cuda::CUDAGuard guard(flat.device());
  int64_t n = 0;
  std::vector<at::Tensor> out;
  out.reserve(like.size());
  for (const auto& x : like) {
    n += x.numel();
    out.push_back(at::empty(x.sizes(), flat.options().memory_format(at::MemoryFormat::Contiguous)));
  }
  TORCH_CHECK(flat.numel() == n, "unflatten: flat has ", flat.numel(), " elements, `like` needs ", n);
  if (out.empty()) return out;
  auto src = flat.contiguous();
  Meta m = build_meta(out, {}, 0, true);
  if (m.chunks == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "hvd_abs_unflatten_cuda", [&] {
    copy_kernel<scalar_t><<<static_cast<unsigned>(m.chunks), kThreads, 0, stream>>>(
        m.table.const_data_ptr<int64_t>(), static_cast<int64_t>(out.size()), m.chunks,
        const_cast<scalar_t*>(src.const_data_ptr<scalar_t>()), false);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace hvd_abs

TORCH_LIBRARY_IMPL(hvd_abs, CUDA, m) {
  m.impl("list_dot", &hvd_abs::list_dot_cuda);
  m.impl("multi_dot", &hvd_abs::multi_dot_cuda);
  m.impl("lincomb_", &hvd_abs::lincomb_cuda);
  m.impl("orthonormalize_", &hvd_abs::orthonormalize_cuda);
  m.impl("flatten", &hvd_abs::flatten_cuda);
  m.impl("unflatten", &hvd_abs::unflatten_cuda);
}
