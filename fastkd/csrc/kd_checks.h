// Argument checks of the kd_fwd op, shared by its CPU (cpu/divergences.cpp) and CUDA
// (cuda/divergences.cu) kernels, so that both refuse the same inputs with the same messages.
// Host code only; inline, so each kernel file gets its own copy.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>

namespace fastkd {
namespace checks {

// Byte range [lo, hi) a strided tensor may touch.
inline std::pair<uintptr_t, uintptr_t> byte_range(const at::Tensor& t) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(t.data_ptr());
  if (t.numel() == 0) return {lo, lo};
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return {lo, lo + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

inline bool overlap(const at::Tensor& a, const at::Tensor& b) {
  const auto x = byte_range(a), y = byte_range(b);
  return x.first < y.second && y.first < x.second;
}

// A gradient buffer: like's device, dtype and shape, rows not sharing memory; it may alias an
// input exactly (inplace mode: every entry is read before it is written), but not overlap one
// in any other way.
inline void check_grad_buffer(const at::Tensor& g, const at::Tensor& like, const char* gname, const char* lname,
                              const at::Tensor& other) {
  TORCH_CHECK(g.device() == like.device(), "fastkd::kd_fwd: ", gname, " must be on ", lname, "'s device ",
              like.device(), ", got ", g.device());
  TORCH_CHECK(g.scalar_type() == like.scalar_type(), "fastkd::kd_fwd: ", gname, " must have the dtype of ", lname,
              " (", like.scalar_type(), "), got ", g.scalar_type());
  TORCH_CHECK(g.sizes() == like.sizes(), "fastkd::kd_fwd: ", gname, " must have the shape of ", lname, " ",
              like.sizes(), ", got ", g.sizes());
  TORCH_CHECK(g.size(2) <= 1 || g.stride(2) == 1, "fastkd::kd_fwd: ", gname, " must be contiguous in its last dim");
  TORCH_CHECK((g.size(0) <= 1 || g.stride(0) != 0) && (g.size(1) <= 1 || g.stride(1) != 0),
              "fastkd::kd_fwd: ", gname, " must not have rows sharing memory (stride 0)");
  for (const at::Tensor* in : {&like, &other}) {
    if (overlap(g, *in)) {
      TORCH_CHECK(g.data_ptr() == in->data_ptr() && g.strides() == in->strides() &&
                      g.element_size() == in->element_size(),
                  "fastkd::kd_fwd: ", gname, " overlaps an input without being exactly that input");
    }
  }
}

struct KdShape {
  int64_t B, R, V, N;
  bool wide;  // an input is float64: float64 math and a float64 loss
};

// Everything about kd_fwd's arguments that does not need to read device memory. The label range
// is the caller's (free on the CPU, a sync on a GPU). Divergence codes as in
// fastkd/reference/divergences.py: 2 jsd, 3 skew_forward_kl, 4 skew_reverse_kl.
inline KdShape check_kd_args(const at::Tensor& student, const at::Tensor& teacher,
                             const std::optional<at::Tensor>& labels, const at::Tensor& loss,
                             const std::optional<at::Tensor>& grad_student,
                             const std::optional<at::Tensor>& grad_teacher, int64_t divergence, double temperature,
                             double beta, double skew, double hard_weight, double softcap,
                             c10::DeviceType device_type) {
  TORCH_CHECK(student.dim() == 3 && teacher.dim() == 3,
              "fastkd::kd_fwd: student and teacher must be 3-D [B, R, V], got ", student.sizes(), " and ",
              teacher.sizes());
  TORCH_CHECK(student.sizes() == teacher.sizes(), "fastkd::kd_fwd: student ", student.sizes(), " and teacher ",
              teacher.sizes(), " must have the same shape");
  TORCH_CHECK(student.device().type() == device_type && teacher.device() == student.device(),
              "fastkd::kd_fwd: student and teacher must be ", c10::DeviceTypeName(device_type),
              " tensors on one device, got ", student.device(), " and ", teacher.device());
  const at::ScalarType ts = student.scalar_type(), tt = teacher.scalar_type();
  auto floating = [](at::ScalarType t) {
    return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
  };
  TORCH_CHECK(floating(ts) && floating(tt),
              "fastkd::kd_fwd: student and teacher must be float32, float16, bfloat16 or float64, got ", ts, " and ",
              tt);
  const bool wide = ts == at::kDouble || tt == at::kDouble;
  const at::ScalarType loss_type = wide ? at::kDouble : at::kFloat;
  const int64_t B = student.size(0), R = student.size(1), V = student.size(2);
  TORCH_CHECK(V >= 1, "fastkd::kd_fwd: the vocabulary (last) dim must be non-empty");
  TORCH_CHECK((V <= 1 || student.stride(2) == 1) && (V <= 1 || teacher.stride(2) == 1),
              "fastkd::kd_fwd: student and teacher must be contiguous in their last dim (strides ", student.strides(),
              " and ", teacher.strides(), ")");
  TORCH_CHECK(loss.device() == student.device() && loss.scalar_type() == loss_type && loss.dim() == 2 &&
                  loss.size(0) == B && loss.size(1) == R,
              "fastkd::kd_fwd: loss must be a ", loss_type, " tensor on ", student.device(), " of shape [", B, ", ",
              R, "] (float64 exactly when an input is float64), got ", loss.scalar_type(), " ", loss.sizes(), " on ",
              loss.device());
  TORCH_CHECK(divergence >= 0 && divergence <= 5, "fastkd::kd_fwd: divergence code must be in 0..5, got ",
              divergence);
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), "fastkd::kd_fwd: temperature must be > 0, got ",
              temperature);
  TORCH_CHECK(divergence != 2 || (beta > 0.0 && beta < 1.0),
              "fastkd::kd_fwd: jsd needs 0 < beta < 1 (beta 0 and 1 map to forward/reverse KL), got ", beta);
  TORCH_CHECK((divergence != 3 && divergence != 4) || (skew >= 0.0 && skew <= 1.0),
              "fastkd::kd_fwd: skew must be in [0, 1], got ", skew);
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), "fastkd::kd_fwd: softcap must be >= 0 (0: none), got ",
              softcap);
  TORCH_CHECK(hard_weight == 0.0 || labels.has_value(), "fastkd::kd_fwd: hard_weight != 0 needs labels");
  if (labels.has_value()) {
    const at::Tensor& L = *labels;
    TORCH_CHECK(L.device() == student.device() && L.scalar_type() == at::kLong && L.dim() == 2 && L.size(0) == B &&
                    L.size(1) == R,
                "fastkd::kd_fwd: labels must be an int64 tensor on ", student.device(), " of shape [", B, ", ", R,
                "], got ", L.scalar_type(), " ", L.sizes(), " on ", L.device());
  }
  if (grad_student.has_value()) check_grad_buffer(*grad_student, student, "grad_student", "student", teacher);
  if (grad_teacher.has_value()) check_grad_buffer(*grad_teacher, teacher, "grad_teacher", "teacher", student);
  if (grad_student.has_value() && grad_teacher.has_value()) {
    TORCH_CHECK(!overlap(*grad_student, *grad_teacher) || grad_student->numel() == 0,
                "fastkd::kd_fwd: grad_student and grad_teacher overlap");
  }
  return {B, R, V, B * R, wide};
}

}  // namespace checks
}  // namespace fastkd
