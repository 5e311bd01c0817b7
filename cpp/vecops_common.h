// Argument checks shared by the CPU (vecops.cpp) and CUDA (vecops_cuda.cu) kernels, so both
// devices reject bad input with the same message.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

namespace hvd_abs {
// Internal linkage on purpose: vecops.cpp is compiled by the C++ compiler and vecops_cuda.cu by
// nvcc's host compiler, which may be a different g++; one shared inline definition picked by the
// linker for both objects can break exception unwinding across them.
namespace {

// Checks that `basis` holds k whole vectors shaped like `v` (k*T tensors, vector-major), all of
// one floating dtype and device. Returns k.
inline int64_t check_basis(const char* op, at::TensorList basis, at::TensorList v) {
  const int64_t T = static_cast<int64_t>(v.size());
  TORCH_CHECK(T > 0 || basis.empty(), op, ": v is empty but the basis is not");
  if (T == 0) return 0;
  TORCH_CHECK(basis.size() % T == 0, op, ": the basis must hold k whole vectors of ", T,
              " tensors each (flat, vector-major), got ", basis.size(), " tensors");
  const auto dtype = v[0].scalar_type();
  const auto device = v[0].device();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": only float32 and float64 are supported, got ",
              dtype, "; cast the vectors first");
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(v[t].scalar_type() == dtype && v[t].device() == device, op, ": tensor ", t,
                " of v has another dtype/device than tensor 0");
  }
  const int64_t k = static_cast<int64_t>(basis.size()) / T;
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t t = 0; t < T; ++t) {
      const auto& b = basis[j * T + t];
      TORCH_CHECK(b.numel() == v[t].numel(), op, ": basis vector ", j, " tensor ", t, " has ", b.numel(),
                  " elements, v's tensor has ", v[t].numel());
      TORCH_CHECK(b.scalar_type() == dtype && b.device() == device, op, ": basis vector ", j, " tensor ", t,
                  " has another dtype/device than v");
    }
  }
  return k;
}

// In-place ops write through data pointers: the output tensors must be dense, and no output
// tensor may share memory with another output tensor or with a basis tensor (the kernels update
// the output in place while other blocks, possibly on other threads, still read the basis).
// Checked on byte ranges: sorted by start, any range that begins before the previous ones end
// overlaps them; basis ranges may overlap each other (they are only read).
inline void check_mutable(const char* op, at::TensorList v, at::TensorList basis) {
  for (size_t t = 0; t < v.size(); ++t) {
    TORCH_CHECK(v[t].is_contiguous(), op, ": tensor ", t, " of the output is not contiguous; pass .contiguous() tensors");
  }
  struct Range {
    uintptr_t begin, end;
    bool out;
  };
  std::vector<Range> ranges;
  ranges.reserve(v.size() + basis.size());
  auto add = [&](const at::Tensor& x, bool out) {
    if (x.numel() == 0) return;
    const auto b = reinterpret_cast<uintptr_t>(x.data_ptr());
    // Basis tensors may be strided views: their span, from the first to one past the last element.
    int64_t span = 1;
    for (int64_t d = 0; d < x.dim(); ++d) span += (x.size(d) - 1) * std::abs(x.stride(d));
    ranges.push_back({b, b + static_cast<uintptr_t>(span * x.element_size()), out});
  };
  for (const auto& x : v) add(x, true);
  for (const auto& x : basis) add(x, false);
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  uintptr_t end_any = 0, end_out = 0;  // furthest end so far, of any range / of output ranges
  for (const auto& r : ranges) {
    TORCH_CHECK(r.begin >= end_out && (!r.out || r.begin >= end_any), op,
                ": the output shares memory with ", r.out ? "another tensor" : "a basis tensor",
                "; pass an output that is not part of the basis (e.g. a .clone())");
    end_any = std::max(end_any, r.end);
    if (r.out) end_out = std::max(end_out, r.end);
  }
}

inline at::Tensor check_coeffs(const char* op, const at::Tensor& c, int64_t k) {
  TORCH_CHECK(c.dim() == 1 && c.numel() == k, op, ": coeffs must be 1-D with one entry per basis vector (", k,
              "), got shape ", c.sizes());
  return c.to(at::kDouble);
}

}  // namespace

// The CPU kernel (vecops.cpp): also the CUDA build's path for a CPU `flat` with CUDA `like` tensors
// (the dispatcher picks CUDA when any argument is on it; `like` only lends shapes).
std::vector<at::Tensor> unflatten_cpu(const at::Tensor& flat, at::TensorList like);

}  // namespace hvd_abs
