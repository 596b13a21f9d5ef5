// Argument checks of the sparse_kd_fwd op, shared by its CPU (cpu/sparse.cpp) and CUDA
// (cuda/sparse.cu) kernels, so that both refuse the same inputs, in the same order and words; the
// messages differ only where they name the device (the CPU ones say "CPU tensor", the CUDA ones
// the device and, where it is wrong, the device that was given). Host code only; inline, so each
// kernel file gets its own copy.
#pragma once

#include "kd_checks.h"  // overlap

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

namespace fastkd {
namespace checks {

struct SparseShape {
  int64_t B, R, V, K, N;
  bool wide;  // student or values is float64: float64 math and a float64 loss
};

// Everything about sparse_kd_fwd's arguments that does not need to read device memory, plus, on
// the CPU (where it is free), the label range when the hard loss indexes with the labels. On a
// GPU index and label ranges are not checked (that would be a device-to-host sync): the kernel
// gives such rows a NaN loss and gradient. The CPU kernel checks its index range while it runs.
// Divergence codes as in fastkd/reference/divergences.py (2 jsd, 3 skew_forward_kl,
// 4 skew_reverse_kl); tail codes 0 renormalize, 1 bucket.
inline SparseShape check_sparse_kd_args(const at::Tensor& student, const at::Tensor& indices,
                                        const at::Tensor& values, const std::optional<at::Tensor>& labels,
                                        const at::Tensor& loss, const std::optional<at::Tensor>& grad_student,
                                        int64_t divergence, double temperature, double beta, double skew,
                                        int64_t tail, int64_t ignore_index, double hard_weight,
                                        c10::DeviceType device_type) {
  constexpr const char* op = "fastkd::sparse_kd_fwd: ";
  const bool cpu = device_type == c10::DeviceType::CPU;
  // the message parts that name devices: "a CPU tensor" / "a tensor on cuda:0", and what was given
  auto where = [&]() -> std::string { return cpu ? " CPU tensor" : c10::str(" tensor on ", student.device()); };
  auto on = [&](const at::Tensor& t) -> std::string { return cpu ? "" : c10::str(" on ", t.device()); };
  // on the student's device (on the CPU: a CPU tensor, whatever its device index)
  auto local = [&](const at::Tensor& t) { return cpu ? t.device().is_cpu() : t.device() == student.device(); };

  TORCH_CHECK(student.dim() == 3, op, "student must be 3-D [B, R, V], got ", student.sizes());
  TORCH_CHECK(student.device().type() == device_type && local(indices) && local(values),
              op, "student, indices and values must be ", c10::DeviceTypeName(device_type), " tensors",
              cpu ? std::string()
                  : c10::str(" on one device, got ", student.device(), ", ", indices.device(), " and ",
                             values.device()));
  const at::ScalarType ts = student.scalar_type(), tv = values.scalar_type();
  auto floating = [](at::ScalarType t) {
    return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
  };
  TORCH_CHECK(floating(ts) && floating(tv), op,
              "student and values must be float32, float16, bfloat16 or float64, got ", ts, " and ", tv);
  // float64 on either side (any mix): float64 math and a float64 loss, as in the reference.
  const bool wide = ts == at::kDouble || tv == at::kDouble;
  const int64_t B = student.size(0), R = student.size(1), V = student.size(2), N = B * R;
  TORCH_CHECK(V >= 1, op, "the vocabulary (last) dim of student must be non-empty");
  TORCH_CHECK(V <= 1 || student.stride(2) == 1, op, "student must be contiguous in its last dim (strides ",
              student.strides(), ")");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 3 && indices.size(0) == B &&
                  indices.size(1) == R && indices.is_contiguous(),
              op, "indices must be a contiguous int64 tensor [", B, ", ", R, ", K], got ", indices.scalar_type(),
              " ", indices.sizes(), indices.is_contiguous() ? "" : " (not contiguous)");
  const int64_t K = indices.size(2);
  TORCH_CHECK(K >= 1 && K <= V, op, "the teacher must hold between 1 and V = ", V, " entries per row, got ", K);
  TORCH_CHECK(values.sizes() == indices.sizes() && values.is_contiguous(), op,
              "values must be contiguous and shaped like indices ", indices.sizes(), ", got ", values.sizes(),
              values.is_contiguous() ? "" : " (not contiguous)");
  const at::ScalarType loss_type = wide ? at::kDouble : at::kFloat;
  TORCH_CHECK(local(loss) && loss.scalar_type() == loss_type && loss.dim() == 2 &&
                  loss.size(0) == B && loss.size(1) == R,
              op, "loss must be a ", loss_type, where(), " of shape [", B, ", ", R,
              "] (float64 exactly when student or values is float64), got ", loss.scalar_type(), " ", loss.sizes(),
              on(loss));
  TORCH_CHECK(divergence >= 0 && divergence <= 5, op, "divergence code must be in 0..5, got ", divergence);
  TORCH_CHECK(tail == 0 || tail == 1, op, "tail code must be 0 (renormalize) or 1 (bucket), got ", tail);
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), op, "temperature must be > 0, got ", temperature);
  TORCH_CHECK(divergence != 2 || (beta > 0.0 && beta < 1.0), op,
              "jsd needs 0 < beta < 1 (beta 0 and 1 map to forward/reverse KL), got ", beta);
  TORCH_CHECK((divergence != 3 && divergence != 4) || (skew >= 0.0 && skew <= 1.0), op,
              "skew must be in [0, 1], got ", skew);
  TORCH_CHECK(hard_weight == 0.0 || labels.has_value(), op, "hard_weight != 0 needs labels");
  if (labels.has_value()) {
    const at::Tensor& L = *labels;
    TORCH_CHECK(local(L) && L.scalar_type() == at::kLong && L.dim() == 2 && L.size(0) == B &&
                    L.size(1) == R,
                op, "labels must be an int64", where(), " of shape [", B, ", ", R, "], got ", L.scalar_type(), " ",
                L.sizes(), on(L));
    if (cpu && hard_weight != 0.0) {  // only the hard loss indexes with them; before any thread starts
      const int64_t* lab = L.data_ptr<int64_t>();
      const int64_t l0 = L.stride(0), l1 = L.stride(1);
      for (int64_t i = 0; i < N; ++i) {
        const int64_t y = lab[(i / R) * l0 + (i % R) * l1];
        TORCH_CHECK(y == ignore_index || (y >= 0 && y < V), op, "label ", y, " at row ", i,
                    " is out of range for a vocabulary of ", V, " (ignore_index is ", ignore_index, ")");
      }
    }
  }
  if (grad_student.has_value()) {
    const at::Tensor& g = *grad_student;
    TORCH_CHECK(local(g) && g.scalar_type() == ts && g.sizes() == student.sizes(), op,
                "grad_student must be a", where(), " with student's dtype and shape (", ts, " ", student.sizes(),
                "), got ", g.scalar_type(), " ", g.sizes(), on(g));
    TORCH_CHECK(V <= 1 || g.stride(2) == 1, op, "grad_student must be contiguous in its last dim");
    TORCH_CHECK((B <= 1 || g.stride(0) != 0) && (R <= 1 || g.stride(1) != 0), op,
                "grad_student must not have rows sharing memory (stride 0)");
    for (const at::Tensor* in : {&student, &indices, &values}) {
      TORCH_CHECK(!overlap(g, *in) || g.numel() == 0, op, "grad_student must not overlap student, indices or values");
    }
  }
  return {B, R, V, K, N, wide};
}

}  // namespace checks
}  // namespace fastkd
