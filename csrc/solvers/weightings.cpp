#include "weightings.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "active_set.h"
#include "dense.h"

namespace emtl::solvers {
namespace {

constexpr double kEps = std::numeric_limits<double>::epsilon();
// Relative to a diagonal entry, times T²: the ridge that MGDA's QP carries.
constexpr double kRoundingRidge = 16.0 * kEps;
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

namespace {

// The minimiser of least norm on the face of the simplex that `alpha` solves MGDA on: where
// G[F, F] is singular (identical gradients, 0 in the hull) the minimisers form a face, and the
// ridge picks one only to within eps₆₄ / ridge. It is α − Pα, P the projector onto the directions
// v of F with G[F, F] v = 0 (eigenvalues at or below the ridge) and 1ᵀv = 0, unless that leaves
// the simplex.
Vector least_norm_minimiser(int n, const Vector& normalized, const std::vector<int>& free_set, const Vector& alpha) {
  const int k = static_cast<int>(free_set.size());
  if (k < 2) return alpha;
  Vector block(static_cast<size_t>(k) * k), values, vectors;
  for (int i = 0; i < k; ++i) {
    for (int j = 0; j < k; ++j) block[static_cast<size_t>(i) * k + j] = at(normalized, n, free_set[i], free_set[j]);
  }
  symmetric_eigh(k, block, values, vectors);
  const double cut = kRoundingRidge * n * n * std::max(values[k - 1], 0.0);
  // P = V0 (I − ĉĉᵀ) V0ᵀ with V0 the null directions and c = V0ᵀ1.
  std::vector<int> null_directions;
  Vector ones_along, alpha_along;
  for (int m = 0; m < k && values[m] <= cut; ++m) {
    double ones = 0.0, on_alpha = 0.0;
    for (int i = 0; i < k; ++i) ones += at(vectors, k, i, m), on_alpha += at(vectors, k, i, m) * alpha[free_set[i]];
    null_directions.push_back(m);
    ones_along.push_back(ones);
    alpha_along.push_back(on_alpha);
  }
  if (null_directions.empty()) return alpha;
  double ones_sq = 0.0, ones_dot_alpha = 0.0;
  for (size_t m = 0; m < null_directions.size(); ++m) {
    ones_sq += ones_along[m] * ones_along[m];
    ones_dot_alpha += ones_along[m] * alpha_along[m];
  }
  // 1 with no part in the null space beyond the eigenvectors' rounding: 1ᵀv = 0 holds there.
  const bool ones_in_null_space = ones_sq > 1e-16 * k;
  Vector result(alpha);
  for (size_t m = 0; m < null_directions.size(); ++m) {
    const double coefficient = alpha_along[m] - (ones_in_null_space ? ones_along[m] * ones_dot_alpha / ones_sq : 0.0);
    for (int i = 0; i < k; ++i) result[free_set[i]] -= coefficient * at(vectors, k, i, null_directions[m]);
  }
  for (int i = 0; i < k; ++i) {
    if (result[free_set[i]] < 0.0) return alpha;
  }
  // A direction below the cut may still matter at the scale of the optimum itself (G graded over
  // many orders, αᵀĜα far below max λ): the move must leave αᵀĜα as it was, to its rounding.
  const auto objective = [&](const Vector& weights, double& magnitude) {
    double value = 0.0;
    magnitude = 0.0;
    for (int i : free_set) {
      for (int j : free_set) {
        const double term = weights[i] * at(normalized, n, i, j) * weights[j];
        value += term;
        magnitude += std::abs(term);
      }
    }
    return value;
  };
  double before_magnitude = 0.0, after_magnitude = 0.0;
  const double before = objective(alpha, before_magnitude);
  const double after = objective(result, after_magnitude);
  if (after > before + 4.0 * k * kEps * std::max(before_magnitude, after_magnitude)) return alpha;
  return result;
}

}  // namespace

Vector mgda_weights(int n, const Vector& gram) {
  const std::vector<bool> active = tasks_with_gradient(n, gram);
  Vector weights(n, 0.0);
  const double total = trace(n, gram);
  if (total > 0.0) {
    const Vector normalized = scaled(gram, 1.0 / total);
    Vector hessian(normalized);
    // A ridge near the rounding level of the diagonal keeps the QP strictly convex where G is
    // singular. It stays above the active set's tolerance (4·T·eps₆₄ of a multiplier) with the
    // weight split T ways: 16·T²·eps₆₄ of each diagonal entry, which moves αᵀGα by at most that
    // times max_i G_ii / tr(G).
    for (int i = 0; i < n; ++i) hessian[static_cast<size_t>(i) * n + i] *= 1.0 + kRoundingRidge * n * n;
    const Vector linear(n, 0.0);
    const QpSolution solution = solve_qp({hessian.data(), linear.data(), n, true, active});
    weights = least_norm_minimiser(n, normalized, solution.free_set, solution.x);
    double sum = 0.0;
    for (double w : weights) sum += w;
    for (double& w : weights) w = sum > 0.0 ? w / sum : 0.0;
  }
  fill_zero_gradient_tasks(weights, active, 1.0 / n);
  return weights;
}

namespace {

// On a fixed free set F of CAGrad's simplex QP min ½wᵀĜw + (s/r)bᵀw, the solution is affine in
// s: w(s) = w0 + s·e, with Ĝw0 = q0·1 on F (q0 = 1/1ᵀĜ_FF⁻¹1) and 1ᵀe = 0, so
// ‖g_w(s)‖² = q0 + s²·eᵀĜe. Returns that piece's fixed point ‖g_w(s)‖ = s: √(q0 / (1 − eᵀĜe)),
// or +∞ where eᵀĜe ≥ 1 (no fixed point on the piece).
double fixed_point_on_piece(int n, const Vector& hessian, const Vector& toward_mean, double radius,
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
  Vector e(n, 0.0);
  for (int i = 0; i < k; ++i) e[free_set[i]] = (sum_b / sum_ones * ones[i] - along_b[i]) / radius;
  const double curvature = quadratic_form(n, hessian, e);
  if (!(curvature < 1.0)) return std::numeric_limits<double>::infinity();
  return std::sqrt(std::max(1.0 / sum_ones, 0.0) / (1.0 - curvature));
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

Vector cagrad_weights(int n, const Vector& gram, double c, double gram_eps) {
  const Vector mean(n, 1.0 / n);
  const double total = trace(n, gram);
  if (!(total > 0.0)) return mean;
  const std::vector<bool> active = tasks_with_gradient(n, gram);
  // The rounding of G to its dtype can make it indefinite by up to T·gram_eps of its diagonal,
  // which would make the simplex QPs below non-convex: a ridge of twice that keeps them convex.
  const double ridge = 2.0 * n * gram_eps;
  const Vector normalized = scaled(gram, 1.0 / total);
  Vector hessian(normalized);
  for (int i = 0; i < n; ++i) hessian[static_cast<size_t>(i) * n + i] *= 1.0 + ridge;
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
  for (int pass = 0; pass < kMaxRadiusPasses; ++pass) {
    for (int i = 0; i < n; ++i) linear[i] = s / radius * toward_mean[i];
    solution = solve_qp({hessian.data(), linear.data(), n, true, active});
    const double sq_norm = quadratic_form(n, hessian, solution.x);
    if (std::abs(sq_norm - s * s) <= 64.0 * kEps * std::max(sq_norm, s * s)) break;
    (sq_norm > s * s ? lo : hi) = s;
    const double root = fixed_point_on_piece(n, hessian, toward_mean, radius, solution.free_set);
    const double next = root > lo && root < hi ? root : (std::isfinite(hi) ? 0.5 * (lo + hi) : 2.0 * s);
    if (next == s) break;
    s = next;
  }
  const Vector& w = solution.x;
  // Where the gradients cancel (g_w* = 0: ‖g_w‖ at the rounding level of G's dtype, measured
  // without the ridge, which alone keeps s above 0 there) π + (r/s)w is undefined: the best
  // worst improvement is 0 and the optimal d are those of the ball that conflict with no task.
  // The one taken is the nearest to g_0, its projection onto the dual cone (DualProj's problem
  // without reg_eps), in the ball whenever the best worst improvement is 0; its weights keep no
  // part in G's null space.
  double spread = 0.0;
  for (int i = 0; i < n; ++i) spread += w[i] * std::sqrt(std::max(at(normalized, n, i, i), 0.0));
  const double combined_norm = std::sqrt(std::max(quadratic_form(n, normalized, w), 0.0));
  Vector weights(mean);
  if (!(s > 0.0) || combined_norm <= std::sqrt(n * gram_eps) * spread) {
    const Vector shift = solve_qp({hessian.data(), toward_mean.data(), n, false, active}).x;
    const double distance = std::sqrt(std::max(quadratic_form(n, normalized, shift), 0.0));
    if (distance <= radius * (1.0 + n * gram_eps) || !(s > 0.0)) {
      const Vector kept = without_null_space(n, normalized, shift, kEps);
      for (int i = 0; i < n; ++i) weights[i] += kept[i];
      return weights;
    }
  }
  // r/‖g_w‖ rather than r/s: equal at the fixed point, and d stays in the ball where the last
  // pass stopped short of it.
  const double ridged_norm = std::sqrt(std::max(quadratic_form(n, hessian, w), 0.0));
  for (int i = 0; i < n; ++i) weights[i] += radius / ridged_norm * w[i];
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
  // B = (G + reg_eps·diag(G)) / ‖G‖_F on the tasks with a gradient, a decoupled unit entry for the
  // others. The ridge, relative to each diagonal entry, moves every α_i (Gα)_i by O(reg_eps)
  // whatever the spread of the gradients' norms.
  Vector bargaining(static_cast<size_t>(n) * n, 0.0);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      const bool both = active[i] && active[j];
      bargaining[static_cast<size_t>(i) * n + j] =
          both ? at(normalized, n, i, j) / (frobenius > 0.0 ? frobenius : 1.0) : (i == j ? 1.0 : 0.0);
    }
    bargaining[static_cast<size_t>(i) * n + i] *= 1.0 + reg_eps;
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

namespace {

// FairGrad's step lengths along a Newton direction in log α: 1, 1/2, ..., 2^-11, and 0 (so that φ
// never increases), as LENGTHS in fairgrad.py.
constexpr int kFairGradLengths = 13;
// The largest change of log α_i in one step (MAX_LOG_STEP in fairgrad.py).
constexpr double kMaxLogStep = 30.0;

// φ(α) = ½αᵀG̃α − Σ h(α_i), h(a) = a^(1 − 1/p) / (1 − 1/p) (log a for p = 1).
double fairgrad_objective(int n, const Vector& fair, const Vector& alpha, double p) {
  double barrier = 0.0;
  for (double a : alpha) barrier += p == 1.0 ? std::log(a) : std::pow(a, 1.0 - 1.0 / p) / (1.0 - 1.0 / p);
  return 0.5 * quadratic_form(n, fair, alpha) - barrier;
}

// t·α with t^(1 + 1/p) = Σ α_i^(1 − 1/p) / αᵀG̃α: the minimiser of φ along the ray through α.
void fair_scale_to_ray_minimum(int n, const Vector& fair, double p, Vector& alpha) {
  double sum = 0.0;
  for (double a : alpha) sum += std::pow(a, 1.0 - 1.0 / p);
  const double t = std::pow(sum / quadratic_form(n, fair, alpha), p / (p + 1.0));
  for (double& a : alpha) a *= t;
}

// Whether every equation (G̃α)_i = α_i^(−1/p) holds to the rounding of its terms, given the
// gradient (G̃α)_i − α_i^(−1/p): further Newton steps would only move α by rounding.
bool fairgrad_converged(int n, const Vector& fair, const Vector& alpha, const Vector& gradient, double p) {
  for (int i = 0; i < n; ++i) {
    double magnitude = std::pow(alpha[i], -1.0 / p);
    for (int j = 0; j < n; ++j) magnitude += std::abs(at(fair, n, i, j)) * alpha[j];
    if (!(std::abs(gradient[i]) <= 4.0 * n * kEps * magnitude)) return false;
  }
  return true;
}

// α·exp(length·log_step) for the length of the lengths 1, ..., 2^-11, 0 that gives the least φ (the
// first of equal ones); empty where some φ is NaN (the tensor-op solver then keeps α).
Vector best_fairgrad_trial(int n, const Vector& fair, const Vector& alpha, const Vector& log_step, double p) {
  Vector best, trial(n);
  double best_objective = std::numeric_limits<double>::infinity();
  for (int k = 0; k < kFairGradLengths; ++k) {
    const double length = k + 1 < kFairGradLengths ? std::ldexp(1.0, -k) : 0.0;
    for (int i = 0; i < n; ++i) trial[i] = alpha[i] * std::exp(length * log_step[i]);
    const double objective = fairgrad_objective(n, fair, trial, p);
    if (std::isnan(objective)) return {};
    if (best.empty() || objective < best_objective) best = trial, best_objective = objective;
  }
  return best;
}

}  // namespace

Vector fairgrad_weights(int n, const Vector& gram, double p, double reg_eps, int iterations) {
  const std::vector<bool> active = tasks_with_gradient(n, gram);
  double total = 0.0;
  for (int i = 0; i < n; ++i) total += active[i] ? at(gram, n, i, i) : 0.0;
  const double scale = total > 0.0 ? total : 1.0;
  // G̃ = G / tr(G) on the tasks with a gradient, a decoupled unit entry for the others, each
  // diagonal entry times 1 + reg_eps.
  Vector fair(static_cast<size_t>(n) * n, 0.0);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      fair[static_cast<size_t>(i) * n + j] = active[i] && active[j] ? at(gram, n, i, j) / scale : (i == j ? 1.0 : 0.0);
    }
    fair[static_cast<size_t>(i) * n + i] *= 1.0 + reg_eps;
  }
  // Newton on φ in log α (fairgrad.py states why), from the solution of the diagonal equations
  // on its ray minimum.
  Vector alpha(n), gradient(n), step(n), log_step(n), column(n);
  for (int i = 0; i < n; ++i) alpha[i] = std::pow(at(fair, n, i, i), -p / (p + 1.0));
  fair_scale_to_ray_minimum(n, fair, p, alpha);
  for (int iteration = 0; iteration < iterations; ++iteration) {
    for (int i = 0; i < n; ++i) {
      double row = 0.0;
      for (int j = 0; j < n; ++j) row += at(fair, n, i, j) * alpha[j];
      gradient[i] = row - std::pow(alpha[i], -1.0 / p);
      step[i] = -gradient[i];
    }
    if (fairgrad_converged(n, fair, alpha, gradient, p)) break;
    GrowingCholesky factor(n);
    for (int j = 0; j < n; ++j) {
      for (int i = 0; i < j; ++i) column[i] = at(fair, n, i, j);
      const double diagonal = at(fair, n, j, j) + std::pow(alpha[j], -1.0 / p - 1.0) / p;
      factor.append(column.data(), diagonal, std::numeric_limits<double>::min());
    }
    factor.solve(step.data());
    double decrement_sq = 0.0, largest = 0.0;
    for (int i = 0; i < n; ++i) {
      decrement_sq -= gradient[i] * step[i];
      log_step[i] = step[i] / alpha[i];
      largest = std::max(largest, std::abs(log_step[i]));
    }
    const double shrink = kMaxLogStep / std::max(largest, kMaxLogStep);
    for (double& s : log_step) s *= shrink;
    // Close to the solution (decrement < 1/4) the full step: convergence stays quadratic.
    Vector candidate(n);
    if (std::sqrt(std::max(decrement_sq, 0.0)) < 0.25) {
      for (int i = 0; i < n; ++i) candidate[i] = alpha[i] * std::exp(log_step[i]);
    } else {
      candidate = best_fairgrad_trial(n, fair, alpha, log_step, p);
    }
    if (candidate.empty()) break;
    fair_scale_to_ray_minimum(n, fair, p, candidate);
    bool finite = true;
    for (double a : candidate) finite = finite && std::isfinite(a);
    // An unusable step leaves α as it is, and so would every later one.
    if (!finite) break;
    alpha = candidate;
  }
  const double back = std::pow(scale, -p / (p + 1.0));
  Vector weights(n, 0.0);
  for (int i = 0; i < n; ++i) weights[i] = active[i] ? alpha[i] * back : 0.0;
  fill_zero_gradient_tasks(weights, active, 1.0);
  return weights;
}

namespace {

// A PCD constraint broken by at most this fraction of max_i N_ii counts as satisfied
// (FEASIBILITY_TOL in pcd.py): where they cannot all hold, the dual is unbounded and its solution
// breaks them by far more.
constexpr double kPcdFeasibilityTol = 1e-6;

// μ ≥ 0 of PCD's dual on N (n ≥ 2), or zeros where the constraints cannot hold together.
Vector pcd_dual_solution(int n, const Vector& normalized, const Vector& taus) {
  const int k = n - 1;
  Vector secondary(static_cast<size_t>(k) * k), linear(k);
  std::vector<bool> has_gradient(k);
  double largest_diagonal = 0.0;
  for (int i = 0; i < n; ++i) largest_diagonal = std::max(largest_diagonal, at(normalized, n, i, i));
  for (int i = 0; i < k; ++i) {
    for (int j = 0; j < k; ++j) secondary[static_cast<size_t>(i) * k + j] = at(normalized, n, i + 1, j + 1);
    // −b_j: the QP is min ½μᵀSμ − bᵀμ. A zero secondary gradient leaves μ_j free (its
    // constraint reads 0 ≥ 0): it stays 0.
    linear[i] = at(normalized, n, i + 1, 0) - taus[i] * at(secondary, k, i, i);
    has_gradient[i] = at(secondary, k, i, i) > 0.0;
  }
  Vector mu = solve_qp({secondary.data(), linear.data(), k, false, has_gradient}).x;
  double broken = -std::numeric_limits<double>::infinity();
  bool finite = true;
  for (int i = 0; i < k; ++i) {
    double row = 0.0;
    for (int j = 0; j < k; ++j) row += at(secondary, k, i, j) * mu[j];
    broken = std::max(broken, -linear[i] - row);
    finite = finite && std::isfinite(mu[i]);
  }
  if (!(finite && broken <= kPcdFeasibilityTol * largest_diagonal)) std::fill(mu.begin(), mu.end(), 0.0);
  return mu;
}

}  // namespace

Vector pcd_weights(int n, const Vector& gram, const Vector& scales, const Vector& taus, double gram_eps) {
  Vector normalized(static_cast<size_t>(n) * n);
  bool finite = true;
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      const double value = at(gram, n, i, j) * scales[i] * scales[j];
      normalized[static_cast<size_t>(i) * n + j] = value;
      finite = finite && std::isfinite(value);
    }
  }
  Vector multipliers(n, 0.0);
  multipliers[0] = 1.0;
  // A non-finite N leaves no dual solution: the tensor-op solver's μ is then not finite, and 0.
  if (n > 1 && finite) {
    const Vector mu = pcd_dual_solution(n, normalized, taus);
    std::copy(mu.begin(), mu.end(), multipliers.begin() + 1);
  }
  const double direction_sq_norm = quadratic_form(n, normalized, multipliers);
  // The rounding of d̃'s squared norm when formed from N, from the entries it sums.
  double magnitude = 0.0;
  for (int i = 0; i < n; ++i) magnitude += std::abs(multipliers[i]) * std::sqrt(std::max(at(normalized, n, i, i), 0.0));
  magnitude *= magnitude;
  const double primary_sq_norm = at(gram, n, 0, 0);
  const bool usable = primary_sq_norm > 0.0 && direction_sq_norm > 10.0 * gram_eps * magnitude;
  const double rescale = usable ? std::sqrt(primary_sq_norm / direction_sq_norm) : 0.0;
  Vector weights(n);
  for (int i = 0; i < n; ++i) weights[i] = multipliers[i] * scales[i] * rescale;
  return weights;
}

namespace {

// C = D⁻¹GD⁻¹ on active×active (0 elsewhere), D = diag(c), c_i = √G_ii on active (1 otherwise).
Vector correlation_matrix(int n, const Vector& gram, const std::vector<bool>& active, Vector& norms) {
  norms.assign(n, 1.0);
  for (int i = 0; i < n; ++i) {
    if (active[i]) norms[i] = std::sqrt(at(gram, n, i, i));
  }
  Vector correlation(static_cast<size_t>(n) * n, 0.0);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      if (active[i] && active[j]) correlation[static_cast<size_t>(i) * n + j] = at(gram, n, i, j) / (norms[i] * norms[j]);
    }
  }
  return correlation;
}

// M⁺ rhs for the symmetric PSD M on its eigenpairs kept at `eps` (dsyevd), and whether rhs has a
// part in M's range above rounding (10·n·eps·‖rhs‖): where it has none the solution is rounding
// noise, not to be rescaled.
Vector pinv_apply(int n, const Vector& matrix, const Vector& rhs, double eps, bool& in_range) {
  Vector values, vectors;
  symmetric_eigh(n, matrix, values, vectors);
  const std::vector<bool> kept = kept_eigenvalues(values, eps);
  Vector solution(n, 0.0);
  double in_range_sq = 0.0, rhs_sq = 0.0;
  for (double value : rhs) rhs_sq += value * value;
  for (int k = 0; k < n; ++k) {
    if (!kept[k]) continue;
    double along = 0.0;
    for (int i = 0; i < n; ++i) along += at(vectors, n, i, k) * rhs[i];
    in_range_sq += along * along;
    for (int i = 0; i < n; ++i) solution[i] += at(vectors, n, i, k) * along / values[k];
  }
  in_range = std::sqrt(in_range_sq) > 10.0 * n * eps * std::sqrt(rhs_sq);
  return solution;
}

}  // namespace

Vector imtl_g_weights(int n, const Vector& gram, double eps) {
  const std::vector<bool> active = tasks_with_gradient(n, gram);
  Vector norms;
  const Vector correlation = correlation_matrix(n, gram, active, norms);
  Vector ones(n);
  for (int i = 0; i < n; ++i) ones[i] = active[i] ? 1.0 : 0.0;
  bool in_range = false;
  const Vector solution = pinv_apply(n, correlation, ones, eps, in_range);
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

Vector config_weights(int n, const Vector& gram, const Vector& preference) {
  const std::vector<bool> active = tasks_with_gradient(n, gram);
  Vector norms;
  const Vector correlation = correlation_matrix(n, gram, active, norms);
  Vector target(n);
  for (int i = 0; i < n; ++i) target[i] = active[i] ? preference[i] : 0.0;
  bool in_range = false;
  Vector solution = pinv_apply(n, correlation, target, kEps, in_range);
  double squared_length = 0.0, summed_projections = 0.0;
  for (int i = 0; i < n; ++i) {
    if (!active[i]) solution[i] = 0.0;
  }
  for (int i = 0; i < n; ++i) {
    double projection = 0.0;
    for (int j = 0; j < n; ++j) projection += at(correlation, n, i, j) * solution[j];
    squared_length += solution[i] * projection;
    summed_projections += norms[i] * projection;
  }
  // Where U⁺p = 0 the solution is rounding noise: its length must not be set from it.
  const bool usable = in_range && squared_length > 0.0;
  Vector weights(n, 0.0);
  for (int i = 0; i < n; ++i) {
    weights[i] = usable && active[i] ? summed_projections / squared_length * solution[i] / norms[i] : 0.0;
  }
  fill_zero_gradient_tasks(weights, active, 1.0);
  return weights;
}

Vector aligned_mtl_weights(int n, const Vector& gram, ScaleMode scale_mode, double eps) {
  const std::vector<bool> active = tasks_with_gradient(n, gram);
  const double total = trace(n, gram);
  Vector values, vectors;
  // B carries Λ^(-1/2): the smallest kept eigenvalues need accuracy relative to themselves.
  jacobi_eigh(n, scaled(gram, total > 0.0 ? 1.0 / total : 0.0), values, vectors);
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

namespace {

// The tasks other than i, in increasing order_keys[i][j]: the order in which task i meets them.
std::vector<int> others_in_key_order(int n, const Vector& order_keys, int i) {
  std::vector<int> others;
  others.reserve(n);
  for (int j = 0; j < n; ++j) {
    if (j != i) others.push_back(j);
  }
  std::stable_sort(others.begin(), others.end(),
                   [&](int a, int b) { return at(order_keys, n, i, a) < at(order_keys, n, i, b); });
  return others;
}

}  // namespace

Vector pcgrad_weights(int n, const Vector& gram, const Vector& order_keys) {
  Vector weights(n, 0.0);
  Vector coefficients(n);  // task i's projected gradient, Σ_m coefficients[m] g_m
  for (int i = 0; i < n; ++i) {
    std::fill(coefficients.begin(), coefficients.end(), 0.0);
    coefficients[i] = 1.0;
    for (const int j : others_in_key_order(n, order_keys, i)) {
      double inner = 0.0;
      for (int m = 0; m < n; ++m) inner += coefficients[m] * at(gram, n, m, j);
      const double sq_norm = at(gram, n, j, j);
      if (inner < 0.0 && sq_norm > 0.0) coefficients[j] -= inner / sq_norm;
    }
    for (int m = 0; m < n; ++m) weights[m] += coefficients[m];
  }
  return weights;
}

Vector gradvac_weights(int n, const Vector& gram, const Vector& order_keys, Vector& targets, double beta,
                       double eps) {
  Vector norms(n), weights(n, 0.0), coefficients(n), inner(n);
  for (int j = 0; j < n; ++j) norms[j] = std::sqrt(std::max(at(gram, n, j, j), 0.0));
  for (int i = 0; i < n; ++i) {
    // Task i's corrected gradient Σ_m coefficients[m] g_m, and its inner products with every g_m.
    std::fill(coefficients.begin(), coefficients.end(), 0.0);
    coefficients[i] = 1.0;
    for (int m = 0; m < n; ++m) inner[m] = at(gram, n, i, m);
    for (const int j : others_in_key_order(n, order_keys, i)) {
      double sq_norm = 0.0;
      for (int m = 0; m < n; ++m) sq_norm += inner[m] * coefficients[m];
      const double own_norm = std::sqrt(std::max(sq_norm, 0.0));
      const double similarity = inner[j] / (own_norm * norms[j] + eps);
      double& target = targets[static_cast<size_t>(i) * n + j];
      if (similarity < target && norms[j] > 0.0) {
        const double sine = std::sqrt(std::max(1.0 - similarity * similarity, 0.0));
        const double target_sine = std::sqrt(std::max(1.0 - target * target, 0.0));
        const double amount = own_norm * (target * sine - similarity * target_sine) / (norms[j] * target_sine + eps);
        coefficients[j] += amount;
        for (int m = 0; m < n; ++m) inner[m] += amount * at(gram, n, j, m);
      }
      target = (1.0 - beta) * target + beta * similarity;
    }
    for (int m = 0; m < n; ++m) weights[m] += coefficients[m];
  }
  return weights;
}

}  // namespace emtl::solvers
