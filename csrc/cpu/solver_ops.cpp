// The CPU kernels of the solver ops torch.ops.emtl_solvers.* (schemas in registration.cpp, fake
// kernels in emtl_kernels/weightings/_compiled.py): checks, widening of G to double, and the
// weights back in their dtype. The solves themselves are torch-free (csrc/solvers/).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "../solvers/weightings.h"

namespace emtl::cpu {
namespace {

using solvers::Vector;

// Weights are float32, or float64 when the losses are float64 (as compute_dtype in Python).
at::ScalarType weights_dtype(const at::Tensor& losses) {
  return losses.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

double weights_eps(const at::Tensor& losses) {
  return weights_dtype(losses) == at::kDouble ? std::numeric_limits<double>::epsilon()
                                              : std::numeric_limits<float>::epsilon();
}

// The relative rounding of G's own dtype.
double gram_eps(const at::Tensor& gram) {
  switch (gram.scalar_type()) {
    case at::kDouble:
      return std::numeric_limits<double>::epsilon();
    case at::kFloat:
      return std::numeric_limits<float>::epsilon();
    case at::kHalf:
      return 0x1p-10;
    default:
      return 0x1p-7;  // bfloat16
  }
}

int checked_num_tasks(const at::Tensor& losses, const at::Tensor& gram, const char* op) {
  TORCH_CHECK(losses.dim() == 1 && losses.numel() > 0, op, ": losses must be a non-empty 1-D tensor [T], got ",
              losses.sizes());
  const int64_t num_tasks = losses.numel();
  TORCH_CHECK(gram.dim() == 2 && gram.size(0) == num_tasks && gram.size(1) == num_tasks, op,
              ": gram must be [T, T] = [", num_tasks, ", ", num_tasks, "], got ", gram.sizes());
  TORCH_CHECK(losses.is_floating_point() && gram.is_floating_point(), op,
              ": losses and gram must be floating point, got ", losses.scalar_type(), " and ", gram.scalar_type());
  TORCH_CHECK(losses.device().is_cpu() && gram.device().is_cpu(), op, ": losses and gram must be on the CPU");
  return static_cast<int>(num_tasks);
}

Vector widened(const at::Tensor& tensor) {
  const at::Tensor contiguous = tensor.to(at::kDouble).contiguous();
  const double* data = contiguous.data_ptr<double>();
  return Vector(data, data + contiguous.numel());
}

at::Tensor as_tensor(const Vector& values, at::IntArrayRef shape, at::ScalarType dtype) {
  at::Tensor result = at::empty(shape, at::TensorOptions().dtype(at::kDouble));
  std::copy(values.begin(), values.end(), result.data_ptr<double>());
  return result.to(dtype);
}

at::Tensor project_onto_dual_cone(const at::Tensor& gram, const at::Tensor& preferences, double norm_eps,
                                  double reg_eps) {
  const char* op = "emtl_solvers::project_onto_dual_cone";
  TORCH_CHECK(preferences.dim() == 2 && preferences.size(1) > 0, op, ": preferences must be [B, T], got ",
              preferences.sizes());
  const int num_tasks = checked_num_tasks(preferences[0], gram, op);
  TORCH_CHECK(preferences.is_floating_point(), op, ": preferences must be floating point");
  const int rows = static_cast<int>(preferences.size(0));
  const Vector result =
      solvers::project_onto_dual_cone(num_tasks, widened(gram), widened(preferences), rows, norm_eps, reg_eps);
  return as_tensor(result, preferences.sizes(), preferences.scalar_type());
}

at::Tensor mgda_weights(const at::Tensor& losses, const at::Tensor& gram) {
  const int num_tasks = checked_num_tasks(losses, gram, "emtl_solvers::mgda_weights");
  return as_tensor(solvers::mgda_weights(num_tasks, widened(gram)), {num_tasks}, weights_dtype(losses));
}

at::Tensor cagrad_weights(const at::Tensor& losses, const at::Tensor& gram, double c) {
  const int num_tasks = checked_num_tasks(losses, gram, "emtl_solvers::cagrad_weights");
  const Vector weights = solvers::cagrad_weights(num_tasks, widened(gram), c, gram_eps(gram));
  return as_tensor(weights, {num_tasks}, weights_dtype(losses));
}

at::Tensor nash_mtl_weights(const at::Tensor& losses, const at::Tensor& gram, double reg_eps,
                            std::optional<double> max_norm, int64_t iterations) {
  const int num_tasks = checked_num_tasks(losses, gram, "emtl_solvers::nash_mtl_weights");
  // Rounding G can make it indefinite by up to T·eps of its dtype relative to diag(G).
  const double ridge = reg_eps + 2.0 * num_tasks * gram_eps(gram);
  const Vector weights =
      solvers::nash_mtl_weights(num_tasks, widened(gram), ridge, max_norm.value_or(0.0), static_cast<int>(iterations));
  return as_tensor(weights, {num_tasks}, weights_dtype(losses));
}

at::Tensor fairgrad_weights(const at::Tensor& losses, const at::Tensor& gram, double p, double reg_eps,
                            double fallback_reg_eps, int64_t iterations) {
  const int num_tasks = checked_num_tasks(losses, gram, "emtl_solvers::fairgrad_weights");
  TORCH_CHECK(p > 0.0 && reg_eps >= 0.0 && fallback_reg_eps >= 0.0 && iterations >= 0,
              "emtl_solvers::fairgrad_weights: p must be > 0, reg_eps, fallback_reg_eps and iterations >= 0, got ", p,
              ", ", reg_eps, ", ", fallback_reg_eps, " and ", iterations);
  const Vector widened_gram = widened(gram);
  Vector weights = solvers::fairgrad_weights(num_tasks, widened_gram, p, reg_eps, static_cast<int>(iterations));
  // Where G's rounding left it indefinite beyond reg_eps (no solution: the steps diverge), the
  // caller's larger ridge makes one exist; the solve runs again only then.
  const bool finite = std::all_of(weights.begin(), weights.end(), [](double w) { return std::isfinite(w); });
  if (!finite) {
    weights = solvers::fairgrad_weights(num_tasks, widened_gram, p, fallback_reg_eps, static_cast<int>(iterations));
  }
  return as_tensor(weights, {num_tasks}, weights_dtype(losses));
}

at::Tensor pcd_weights(const at::Tensor& losses, const at::Tensor& gram, const at::Tensor& scales,
                       const at::Tensor& taus) {
  const char* op = "emtl_solvers::pcd_weights";
  const int num_tasks = checked_num_tasks(losses, gram, op);
  TORCH_CHECK(scales.dim() == 1 && scales.numel() == num_tasks, op, ": scales must be [T] = [", num_tasks,
              "], got ", scales.sizes());
  TORCH_CHECK(taus.dim() == 1 && taus.numel() == num_tasks - 1, op, ": taus must be [T - 1] = [", num_tasks - 1,
              "], got ", taus.sizes());
  TORCH_CHECK(scales.is_floating_point() && taus.is_floating_point() && scales.device().is_cpu() &&
                  taus.device().is_cpu(),
              op, ": scales and taus must be floating point CPU tensors");
  const Vector weights =
      solvers::pcd_weights(num_tasks, widened(gram), widened(scales), widened(taus), gram_eps(gram));
  return as_tensor(weights, {num_tasks}, weights_dtype(losses));
}

at::Tensor imtl_g_weights(const at::Tensor& losses, const at::Tensor& gram) {
  const int num_tasks = checked_num_tasks(losses, gram, "emtl_solvers::imtl_g_weights");
  const Vector weights = solvers::imtl_g_weights(num_tasks, widened(gram), weights_eps(losses));
  return as_tensor(weights, {num_tasks}, weights_dtype(losses));
}

at::Tensor config_weights(const at::Tensor& losses, const at::Tensor& gram,
                          const std::optional<at::Tensor>& preference) {
  const char* op = "emtl_solvers::config_weights";
  const int num_tasks = checked_num_tasks(losses, gram, op);
  Vector cosines(num_tasks, 1.0);
  if (preference.has_value()) {
    TORCH_CHECK(preference->dim() == 1 && preference->numel() == num_tasks, op, ": preference must be [T] = [",
                num_tasks, "], got ", preference->sizes());
    TORCH_CHECK(preference->is_floating_point() && preference->device().is_cpu(), op,
                ": preference must be a floating point CPU tensor");
    cosines = widened(*preference);
  }
  const Vector weights = solvers::config_weights(num_tasks, widened(gram), cosines);
  return as_tensor(weights, {num_tasks}, weights_dtype(losses));
}

void check_order_keys(const at::Tensor& order_keys, int num_tasks, const char* op) {
  TORCH_CHECK(order_keys.dim() == 2 && order_keys.size(0) == num_tasks && order_keys.size(1) == num_tasks, op,
              ": order_keys must be [T, T] = [", num_tasks, ", ", num_tasks, "], got ", order_keys.sizes());
  TORCH_CHECK(order_keys.is_floating_point() && order_keys.device().is_cpu(), op,
              ": order_keys must be a floating point CPU tensor");
}

at::Tensor pcgrad_weights(const at::Tensor& losses, const at::Tensor& gram, const at::Tensor& order_keys) {
  const char* op = "emtl_solvers::pcgrad_weights";
  const int num_tasks = checked_num_tasks(losses, gram, op);
  check_order_keys(order_keys, num_tasks, op);
  const Vector weights = solvers::pcgrad_weights(num_tasks, widened(gram), widened(order_keys));
  return as_tensor(weights, {num_tasks}, weights_dtype(losses));
}

std::tuple<at::Tensor, at::Tensor> gradvac_weights(const at::Tensor& losses, const at::Tensor& gram,
                                                   const at::Tensor& order_keys, const at::Tensor& targets,
                                                   double beta, double eps) {
  const char* op = "emtl_solvers::gradvac_weights";
  const int num_tasks = checked_num_tasks(losses, gram, op);
  check_order_keys(order_keys, num_tasks, op);
  TORCH_CHECK(targets.dim() == 2 && targets.size(0) == num_tasks && targets.size(1) == num_tasks, op,
              ": targets must be [T, T] = [", num_tasks, ", ", num_tasks, "], got ", targets.sizes());
  TORCH_CHECK(targets.is_floating_point() && targets.device().is_cpu(), op,
              ": targets must be a floating point CPU tensor");
  Vector moved = widened(targets);
  const Vector weights = solvers::gradvac_weights(num_tasks, widened(gram), widened(order_keys), moved, beta, eps);
  return {as_tensor(weights, {num_tasks}, weights_dtype(losses)),
          as_tensor(moved, {num_tasks, num_tasks}, targets.scalar_type())};
}

solvers::ScaleMode scale_mode_named(const std::string& name) {
  if (name == "min") return solvers::ScaleMode::kMin;
  if (name == "median") return solvers::ScaleMode::kMedian;
  TORCH_CHECK(name == "rmse", "emtl_solvers::aligned_mtl_weights: scale_mode must be min, median or rmse, got ",
              name);
  return solvers::ScaleMode::kRmse;
}

at::Tensor aligned_mtl_weights(const at::Tensor& losses, const at::Tensor& gram, std::string scale_mode) {
  const int num_tasks = checked_num_tasks(losses, gram, "emtl_solvers::aligned_mtl_weights");
  const Vector weights =
      solvers::aligned_mtl_weights(num_tasks, widened(gram), scale_mode_named(scale_mode), weights_eps(losses));
  return as_tensor(weights, {num_tasks}, weights_dtype(losses));
}

}  // namespace

TORCH_LIBRARY_IMPL(emtl_solvers, CPU, m) {
  m.impl("project_onto_dual_cone", &project_onto_dual_cone);
  m.impl("mgda_weights", &mgda_weights);
  m.impl("cagrad_weights", &cagrad_weights);
  m.impl("nash_mtl_weights", &nash_mtl_weights);
  m.impl("fairgrad_weights", &fairgrad_weights);
  m.impl("pcd_weights", &pcd_weights);
  m.impl("imtl_g_weights", &imtl_g_weights);
  m.impl("config_weights", &config_weights);
  m.impl("aligned_mtl_weights", &aligned_mtl_weights);
  m.impl("pcgrad_weights", &pcgrad_weights);
  m.impl("gradvac_weights", &gradvac_weights);
}

}  // namespace emtl::cpu
