// Argument checks of the relational ops (rkd_distance_fwd, rkd_angle_fwd,
// similarity_preserving_fwd), shared by their CPU (cpu/relational.cpp) and CUDA
// (cuda/relational.cu) kernels, so that both refuse the same inputs, in the same order and words;
// the messages differ only where they name the device (the CUDA ones ask for the student's device
// and say which device was given). Host code only; inline, so each kernel file gets its own copy.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

namespace fastkd {
namespace checks {

struct RelationalShape {
  int64_t N, Ds, Dt;  // embeddings, and the student's and teacher's widths
  bool wide;          // an input is float64: float64 math and a float64 loss
};

// The checks every relational op makes of its embeddings, loss and gradient buffer; `op` is the
// op's name (without "fastkd::").
inline RelationalShape check_relational_args(const char* op, const at::Tensor& s, const at::Tensor& t,
                                             const at::Tensor& loss, const std::optional<at::Tensor>& grad,
                                             c10::DeviceType device_type) {
  const bool cpu = device_type == c10::DeviceType::CPU;
  // on the student's device (on the CPU: a CPU tensor, whatever its device index)
  auto local = [&](const at::Tensor& x) { return cpu ? x.device().is_cpu() : x.device() == s.device(); };
  auto on = [&](const at::Tensor& x) -> std::string { return cpu ? "" : c10::str(" on ", x.device()); };
  TORCH_CHECK(s.dim() == 2 && t.dim() == 2, "fastkd::", op, ": student and teacher must be 2-D [N, D], got ",
              s.sizes(), " and ", t.sizes());
  TORCH_CHECK(s.size(0) == t.size(0), "fastkd::", op, ": student and teacher must have the same N, got ",
              s.size(0), " and ", t.size(0));
  TORCH_CHECK(s.size(0) >= 2, "fastkd::", op, ": needs N >= 2 embeddings, got ", s.size(0));
  TORCH_CHECK(s.size(1) >= 1 && t.size(1) >= 1, "fastkd::", op, ": embeddings must be non-empty (D >= 1)");
  TORCH_CHECK(s.device().type() == device_type && local(t), "fastkd::", op, ": student and teacher must be ",
              c10::DeviceTypeName(device_type), " tensors",
              cpu ? std::string() : c10::str(" on one device, got ", s.device(), " and ", t.device()));
  auto floating = [](at::ScalarType x) {
    return x == at::kFloat || x == at::kHalf || x == at::kBFloat16 || x == at::kDouble;
  };
  TORCH_CHECK(floating(s.scalar_type()) && floating(t.scalar_type()), "fastkd::", op,
              ": student and teacher must be floating (float32, float16, bfloat16 or float64), got ",
              s.scalar_type(), " and ", t.scalar_type());
  const bool wide = s.scalar_type() == at::kDouble || t.scalar_type() == at::kDouble;
  const char* device_words = cpu ? " CPU tensor" : " CUDA tensor on the student's device";
  TORCH_CHECK(local(loss) && loss.numel() == 1 && loss.scalar_type() == (wide ? at::kDouble : at::kFloat),
              "fastkd::", op, ": loss must be a one-element ", (wide ? "float64" : "float32"), device_words,
              ", got ", loss.scalar_type(), " ", loss.sizes(), on(loss));
  if (grad.has_value()) {
    const at::Tensor& g = *grad;
    TORCH_CHECK(local(g) && g.scalar_type() == s.scalar_type() && g.sizes() == s.sizes(), "fastkd::", op,
                ": grad_student must be a", device_words, " with student's dtype and shape (", s.scalar_type(), " ",
                s.sizes(), "), got ", g.scalar_type(), " ", g.sizes(), on(g));
  }
  return {s.size(0), s.size(1), t.size(1), wide};
}

// rkd_distance_fwd: the checks of every relational op, then its own eps and huber_delta.
inline RelationalShape check_rkd_distance_args(const at::Tensor& s, const at::Tensor& t, const at::Tensor& loss,
                                               const std::optional<at::Tensor>& grad, double eps,
                                               double huber_delta, c10::DeviceType device_type) {
  const RelationalShape sh = check_relational_args("rkd_distance_fwd", s, t, loss, grad, device_type);
  TORCH_CHECK(eps > 0.0 && std::isfinite(eps), "fastkd::rkd_distance_fwd: eps must be > 0, got ", eps);
  TORCH_CHECK(huber_delta >= 0.0 && std::isfinite(huber_delta),
              "fastkd::rkd_distance_fwd: huber_delta must be >= 0, got ", huber_delta);
  return sh;
}

}  // namespace checks
}  // namespace fastkd
