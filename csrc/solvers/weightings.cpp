#include "weightings.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "active_set.h"
#include "dense.h"

namespace emtl::solvers {
namespace {

constexpr double kEps = std::numeric_limits<double>::epsilon();
// CAGrad's fixed point ‖g_w(s)‖ = s: every pass halves its bracket at worst.
constexpr int kMaxRadiusPasses = 200;

double at(const Vector& matrix, int n, int i, int j) { return matrix[static_cast<size_t>(i) * n + j]; }

double trace(int n, const Vector& gram) {
  double sum = 0.0;
  for (int i = 0; i < n; ++i) sum += at(gram, n, i, i);
  return sum;
}

std::vector<bool> tasks_with_gradient(int n, const Vector& gram) {
  std::vector<bool> active(n);
  for (int i = 0; i < n; ++i) active[i] = at(gram, n, i, i) > 0.0;
  return active;
}

Vector scaled(const Vector& matrix, double factor) {
  Vector result(matrix);
  for (double& value : result) value *= factor;
  return result;
}

double quadratic_form(int n, const Vector& matrix, const Vector& x) {
  double sum = 0.0;
  for (int i = 0; i < n; ++i) {
    double row = 0.0;
    for (int j = 0; j < n; ++j) row += at(matrix, n, i, j) * x[j];
    sum += x[i] * row;
  }
  return sum;
}

// The tasks without a gradient get the mean weight of the others (`neutral` when none has one).
void fill_zero_gradient_tasks(Vector& weights, const std::vector<bool>& active, double neutral) {
  double sum = 0.0;
  int count = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    if (active[i]) sum += weights[i], ++count;
  }
  const double fill = count > 0 ? sum / count : neutral;
  for (size_t i = 0; i < weights.size(); ++i) {
    if (!active[i]) weights[i] = fill;
  }
}

// Eigenvalues above n·eps·λ_max count (torch.linalg.pinv's default cut).
std::vector<bool> kept_eigenvalues(const Vector& values, double eps) {
  const int n = static_cast<int>(values.size());
  const double cut = n * eps * std::max(values[n - 1], 0.0);
  std::vector<bool> kept(n);
  for (int i = 0; i < n; ++i) kept[i] = values[i] > cut;
  return kept;
}

}  // namespace

Vector project_onto_dual_cone(int n, const Vector& gram, const Vector& preferences, int rows, double norm_eps,
                              double reg_eps) {
  const double total = trace(n, gram);
  const bool usable = total > 0.0 && total >= norm_eps;
  Vector hessian = scaled(gram, usable ? 1.0 / total : 0.0);
  for (int i = 0; i < n; ++i) hessian[static_cast<size_t>(i) * n + i] += reg_eps;
  Vector result(preferences);
  Vector linear(n);
  for (int b = 0; b < rows; ++b) {
    // v = u + x, x ≥ 0: minimise ½xᵀG̃x + (G̃u)ᵀx.
    const double* u = &preferences[static_cast<size_t>(b) * n];
    for (int i = 0; i < n; ++i) {
      linear[i] = 0.0;
      for (int j = 0; j < n; ++j) linear[i] += at(hessian, n, i, j) * u[j];
    }
    const QpSolution solution = solve_qp({hessian.data(), linear.data(), n, false, {}});
    for (int i = 0; i < n; ++i) result[static_cast<size_t>(b) * n + i] += solution.x[i];
  }
  return result;
}

Vector mgda_weights(int n, const Vector& gram) {
  const std::vector<bool> active = tasks_with_gradient(n, gram);
  Vector weights(n, 0.0);
  const double total = trace(n, gram);
  if (total > 0.0) {
    const Vector hessian = scaled(gram, 1.0 / total);
    const Vector linear(n, 0.0);
    weights = solve_qp({hessian.data(), linear.data(), n, true, active}).x;
    double sum = 0.0;
    for (double w : weights) sum += w;
    for (double& w : weights) w = sum > 0.0 ? w / sum : 0.0;
  }
  fill_zero_gradient_tasks(weights, active, 1.0 / n);
  return weights;
}

namespace {

// On a fixed free set F of CAGrad's simplex QP min ½wᵀĜw + (s/r)bᵀw, the solution is affine in
// s: w(s) = w0 + s·e, with Ĝw0 = q0·1 on F (q0 = 1/1ᵀĜ_FF⁻¹1), 1ᵀe = 0, and
// ‖g_w(s)‖² = q0 + s²·eᵀĜe.
struct AffinePiece {
  Vector w0, e;
  double q0 = 0.0, curvature = 0.0;
};

AffinePiece affine_piece(int n, const Vector& hessian, const Vector& toward_mean, double radius,
                         const std::vector<int>& free_set) {
  const int k = static_cast<int>(free_set.size());
  GrowingCholesky factor(k);
  Vector column(k);
  for (int j = 0; j < k; ++j) {
    for (int i = 0; i < j; ++i) column[i] = at(hessian, n, free_set[i], free_set[j]);
    const double diagonal = at(hessian, n, free_set[j], free_set[j]);
    factor.append(column.data(), diagonal, std::max(16.0 * n * kEps * diagonal, std::numeric_limits<double>::min()));
  }
  Vector ones(k, 1.0), along_b(k);
  for (int i = 0; i < k; ++i) along_b[i] = toward_mean[free_set[i]];
  factor.solve(ones.data());
  factor.solve(along_b.data());
  double sum_ones = 0.0, sum_b = 0.0;
  for (int i = 0; i < k; ++i) sum_ones += ones[i], sum_b += along_b[i];
  AffinePiece piece{Vector(n, 0.0), Vector(n, 0.0), 1.0 / sum_ones, 0.0};
  for (int i = 0; i < k; ++i) {
    piece.w0[free_set[i]] = ones[i] / sum_ones;
    piece.e[free_set[i]] = (sum_b / sum_ones * ones[i] - along_b[i]) / radius;
  }
  piece.curvature = quadratic_form(n, hessian, piece.e);
  return piece;
}

// x less its part along the eigenvectors of `matrix` whose eigenvalues are cut.
Vector without_null_space(int n, const Vector& matrix, const Vector& x, double eps) {
  Vector values, vectors;
  symmetric_eigh(n, matrix, values, vectors);
  const std::vector<bool> kept = kept_eigenvalues(values, eps);
  Vector result(n, 0.0);
  for (int k = 0; k < n; ++k) {
    if (!kept[k]) continue;
    double along = 0.0;
    for (int i = 0; i < n; ++i) along += at(vectors, n, i, k) * x[i];
    for (int i = 0; i < n; ++i) result[i] += along * at(vectors, n, i, k);
  }
  return result;
}

}  // namespace

Vector cagrad_weights(int n, const Vector& gram, double c, double eps) {
  const Vector mean(n, 1.0 / n);
  const double total = trace(n, gram);
  if (!(total > 0.0)) return mean;
  const std::vector<bool> active = tasks_with_gradient(n, gram);
  const Vector hessian = scaled(gram, 1.0 / total);
  Vector toward_mean(n, 0.0);
  double largest_diagonal = 0.0;
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) toward_mean[i] += at(hessian, n, i, j) / n;
    largest_diagonal = std::max(largest_diagonal, at(hessian, n, i, i));
  }
  double mean_sq_norm = 0.0;
  for (int i = 0; i < n; ++i) mean_sq_norm += toward_mean[i] / n;
  const double radius = c * std::sqrt(std::max(mean_sq_norm, 0.0));
  if (!(radius > 0.0)) return mean;
  // The dual min_w bᵀw + r‖g_w‖ is min over s > 0 of min_w bᵀw + (r/2)(‖g_w‖²/s + s): for each
  // s a simplex QP, whose solution w(s) is optimal for the dual where ‖g_w(s)‖ = s. That
  // fixed point is bracketed ([lo, hi]) and found exactly on the QP's final free set.
  double lo = 0.0, hi = std::numeric_limits<double>::infinity();
  double s = std::sqrt(largest_diagonal);  // ≥ ‖g_w‖ for every w on the simplex
  Vector linear(n);
  QpSolution solution;
  AffinePiece piece;
  for (int pass = 0; pass < kMaxRadiusPasses; ++pass) {
    for (int i = 0; i < n; ++i) linear[i] = s / radius * toward_mean[i];
    solution = solve_qp({hessian.data(), linear.data(), n, true, active});
    const double sq_norm = quadratic_form(n, hessian, solution.x);
    piece = affine_piece(n, hessian, toward_mean, radius, solution.free_set);
    if (std::abs(sq_norm - s * s) <= 64.0 * kEps * std::max(sq_norm, s * s)) break;
    (sq_norm > s * s ? lo : hi) = s;
    const double root =
        piece.curvature < 1.0 ? std::sqrt(std::max(piece.q0, 0.0) / (1.0 - piece.curvature)) : hi;
    const double next = root > lo && root < hi ? root : (std::isfinite(hi) ? 0.5 * (lo + hi) : 2.0 * s);
    if (next == s) break;
    s = next;
  }
  const Vector& w = solution.x;
  double spread = 0.0;
  for (int i = 0; i < n; ++i) spread += w[i] * std::sqrt(std::max(at(hessian, n, i, i), 0.0));
  Vector weights(mean);
  if (s > std::sqrt(kEps) * spread) {
    for (int i = 0; i < n; ++i) weights[i] += radius / s * w[i];
    return weights;
  }
  // The gradients cancel (g_w* = 0): r/‖g_w‖ has no limit, but d does. On the final piece
  // (r/s)·w = (r/s)·w0 + r·e with w0 in the null space of G; the weights keep no part there.
  Vector direction(piece.e);
  if (s > 0.0) {
    for (int i = 0; i < n; ++i) direction[i] += piece.w0[i] / s;
  }
  const Vector shift = without_null_space(n, hessian, direction, eps);
  for (int i = 0; i < n; ++i) weights[i] += radius * shift[i];
  return weights;
}

namespace {

// t·α with t = √(n / αᵀBα): the minimiser of φ along the ray through α.
void scale_to_ray_minimum(int n, const Vector& bargaining, Vector& alpha) {
  const double t = std::sqrt(n / quadratic_form(n, bargaining, alpha));
  for (double& a : alpha) a *= t;
}

}  // namespace

Vector nash_mtl_weights(int n, const Vector& gram, double reg_eps, double max_norm, int iterations) {
  const std::vector<bool> active = tasks_with_gradient(n, gram);
  const double total = trace(n, gram);
  Vector normalized = scaled(gram, total > 0.0 ? 1.0 / total : 0.0);
  double frobenius = 0.0;
  for (double value : normalized) frobenius += value * value;
  frobenius = std::sqrt(frobenius);
  // B = G / ‖G‖_F + reg_eps·I on the tasks with a gradient, a decoupled unit entry for the others.
  Vector bargaining(static_cast<size_t>(n) * n, 0.0);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      const bool both = active[i] && active[j];
      bargaining[static_cast<size_t>(i) * n + j] =
          both ? at(normalized, n, i, j) / (frobenius > 0.0 ? frobenius : 1.0) : (i == j ? 1.0 : 0.0);
    }
    bargaining[static_cast<size_t>(i) * n + i] += reg_eps;
  }
  // Damped Newton on φ(α) = ½αᵀBα − Σ log α_i (self-concordant: the step Δ/(1 + λ), λ the Newton
  // decrement, stays in α > 0; a full step once λ < 1/4), from diag(B)^{-1/2} on its ray minimum.
  Vector alpha(n), gradient(n), step(n), column(n);
  for (int i = 0; i < n; ++i) alpha[i] = 1.0 / std::sqrt(at(bargaining, n, i, i));
  scale_to_ray_minimum(n, bargaining, alpha);
  for (int iteration = 0; iteration < iterations; ++iteration) {
    GrowingCholesky factor(n);
    for (int j = 0; j < n; ++j) {
      for (int i = 0; i < j; ++i) column[i] = at(bargaining, n, i, j);
      const double diagonal = at(bargaining, n, j, j) + 1.0 / (alpha[j] * alpha[j]);
      factor.append(column.data(), diagonal, std::numeric_limits<double>::min());
    }
    for (int i = 0; i < n; ++i) {
      double row = 0.0;
      for (int j = 0; j < n; ++j) row += at(bargaining, n, i, j) * alpha[j];
      gradient[i] = row - 1.0 / alpha[i];
      step[i] = -gradient[i];
    }
    factor.solve(step.data());
    double decrement_sq = 0.0;
    for (int i = 0; i < n; ++i) decrement_sq -= gradient[i] * step[i];
    const double decrement = std::sqrt(std::max(decrement_sq, 0.0));
    if (!std::isfinite(decrement) || decrement <= kEps) break;
    const double damping = decrement < 0.25 ? 1.0 : 1.0 / (1.0 + decrement);
    for (int i = 0; i < n; ++i) alpha[i] += damping * step[i];
    scale_to_ray_minimum(n, bargaining, alpha);
  }
  // α solves α_i (Bα)_i = 1 for B ≈ G / ‖G‖_F: α / √‖G‖_F solves it for G.
  const double gram_norm = total * frobenius;
  Vector weights(n, 0.0);
  for (int i = 0; i < n; ++i) weights[i] = active[i] ? alpha[i] / std::sqrt(gram_norm) : 0.0;
  fill_zero_gradient_tasks(weights, active, 1.0);
  if (max_norm > 0.0) {
    const double update_norm = std::sqrt(std::max(quadratic_form(n, gram, weights), 0.0));
    if (update_norm > max_norm) {
      for (double& w : weights) w *= max_norm / update_norm;
    }
  }
  return weights;
}

Vector imtl_g_weights(int n, const Vector& gram, double eps) {
  const std::vector<bool> active = tasks_with_gradient(n, gram);
  Vector norms(n, 1.0);
  for (int i = 0; i < n; ++i) {
    if (active[i]) norms[i] = std::sqrt(at(gram, n, i, i));
  }
  Vector correlation(static_cast<size_t>(n) * n, 0.0);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      if (active[i] && active[j]) correlation[static_cast<size_t>(i) * n + j] = at(gram, n, i, j) / (norms[i] * norms[j]);
    }
  }
  // C⁺1 on the kept eigenpairs; whether 1 has a part in C's range above rounding.
  Vector values, vectors;
  symmetric_eigh(n, correlation, values, vectors);
  const std::vector<bool> kept = kept_eigenvalues(values, eps);
  Vector solution(n, 0.0);
  double in_range_sq = 0.0, rhs_sq = 0.0;
  for (int i = 0; i < n; ++i) rhs_sq += active[i] ? 1.0 : 0.0;
  for (int k = 0; k < n; ++k) {
    if (!kept[k]) continue;
    double along = 0.0;
    for (int i = 0; i < n; ++i) along += active[i] ? at(vectors, n, i, k) : 0.0;
    in_range_sq += along * along;
    for (int i = 0; i < n; ++i) solution[i] += at(vectors, n, i, k) * along / values[k];
  }
  const bool in_range = std::sqrt(in_range_sq) > 10.0 * n * eps * std::sqrt(rhs_sq);
  Vector weights(n, 0.0);
  double sum = 0.0, magnitude = 0.0;
  for (int i = 0; i < n; ++i) {
    weights[i] = active[i] ? solution[i] / norms[i] : 0.0;
    sum += weights[i];
    magnitude += std::abs(weights[i]);
  }
  // Where 1 has no part in C's range the solution is rounding noise: no weights are made of it.
  const bool normalizable = in_range && std::abs(sum) > n * eps * magnitude;
  for (double& w : weights) w = normalizable ? w / sum : 0.0;
  fill_zero_gradient_tasks(weights, active, 1.0 / n);
  return weights;
}

Vector aligned_mtl_weights(int n, const Vector& gram, ScaleMode scale_mode, double eps) {
  const std::vector<bool> active = tasks_with_gradient(n, gram);
  const double total = trace(n, gram);
  Vector values, vectors;
  symmetric_eigh(n, scaled(gram, total > 0.0 ? 1.0 / total : 0.0), values, vectors);
  const std::vector<bool> kept = kept_eigenvalues(values, eps);
  int rank = 0;
  double kept_sum = 0.0;
  for (int k = 0; k < n; ++k) {
    if (kept[k]) ++rank, kept_sum += values[k];
  }
  Vector weights(n, 1.0 / n);
  if (rank > 0) {
    // The kept eigenvalues are the last `rank` of the ascending values.
    double scale = values[n - rank];
    if (scale_mode == ScaleMode::kMedian) scale = values[n - rank + (rank - 1) / 2];
    if (scale_mode == ScaleMode::kRmse) scale = kept_sum / rank;
    const double root_scale = std::sqrt(std::max(scale, 0.0));
    Vector aligned(n, 0.0);
    for (int k = 0; k < n; ++k) {
      if (!kept[k]) continue;
      double along = 0.0;
      for (int i = 0; i < n; ++i) along += at(vectors, n, i, k) / n;
      for (int i = 0; i < n; ++i) aligned[i] += root_scale * at(vectors, n, i, k) * along / std::sqrt(values[k]);
    }
    weights = aligned;
  }
  fill_zero_gradient_tasks(weights, active, 1.0 / n);
  return weights;
}

}  // namespace emtl::solvers
