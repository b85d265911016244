#include "active_set.h"

#include <cmath>
#include <limits>

#include "dense.h"

namespace emtl::solvers {
namespace {

constexpr double kEps = std::numeric_limits<double>::epsilon();

class ActiveSet {
 public:
  explicit ActiveSet(const QuadraticProgram& p)
      : p_(p), n_(p.n), x_(p.n, 0.0), is_free_(p.n, false), blocked_(p.n, false), factor_(p.n) {}

  QpSolution run() {
    if (p_.simplex && !start_at_best_vertex()) return {x_, free_};
    const int max_passes = 4 * n_ + 16;
    std::vector<double> z;
    for (int pass = 0; pass < max_passes; ++pass) {
      const double multiplier = solve_on_free_set(z);
      if (!all_finite(z, multiplier)) {
        // H[F, F] is singular or indefinite beyond its pivots' floor (a G rounded to float32):
        // the index just added (still at 0) is taken back and x stays; otherwise x is final.
        if (free_.empty() || x_[free_.back()] != 0.0) break;
        drop(free_.back());
        continue;
      }
      if (!step_inside(z)) continue;
      multiplier_ = multiplier;
      if (!add_most_violated()) break;
    }
    return {x_, free_};
  }

 private:
  double h(int i, int j) const { return p_.hessian[static_cast<size_t>(i) * n_ + j]; }
  bool included(int i) const { return p_.included.empty() || p_.included[i]; }
  // Raising a pivot to this floor moves H by a relative 16·n·eps along one direction: the size
  // of the rounding that made it singular or indefinite.
  double pivot_floor(int j) const { return std::max(16.0 * n_ * kEps * std::abs(h(j, j)), std::numeric_limits<double>::min()); }

  bool start_at_best_vertex() {
    int best = -1;
    for (int i = 0; i < n_; ++i) {
      if (!included(i)) continue;
      if (best < 0 || 0.5 * h(i, i) + p_.linear[i] < 0.5 * h(best, best) + p_.linear[best]) best = i;
    }
    if (best < 0) return false;
    x_[best] = 1.0;
    add(best);
    return true;
  }

  void add(int j) {
    std::vector<double> column(free_.size());
    for (size_t k = 0; k < free_.size(); ++k) column[k] = h(free_[k], j);
    factor_.append(column.data(), h(j, j), pivot_floor(j));
    free_.push_back(j);
    is_free_[j] = true;
  }

  // z on the free set (in free_'s order) minimising the objective with the other x at 0 (and
  // Σ z = 1 on the simplex); returns the simplex multiplier μ (0 on the orthant).
  double solve_on_free_set(std::vector<double>& z) const {
    const size_t k = free_.size();
    z.assign(k, 0.0);
    for (size_t i = 0; i < k; ++i) z[i] = -p_.linear[free_[i]];
    factor_.solve(z.data());
    if (!p_.simplex) return 0.0;
    std::vector<double> ones(k, 1.0);
    factor_.solve(ones.data());
    double sum_ones = 0.0, sum_z = 0.0;
    for (size_t i = 0; i < k; ++i) sum_ones += ones[i], sum_z += z[i];
    // H z = μ1 − q with 1ᵀz = 1: z = H⁻¹(−q) + μ H⁻¹1.
    const double multiplier = (1.0 - sum_z) / sum_ones;
    for (size_t i = 0; i < k; ++i) z[i] += multiplier * ones[i];
    return multiplier;
  }

  static bool all_finite(const std::vector<double>& z, double multiplier) {
    for (double value : z) {
      if (!std::isfinite(value)) return false;
    }
    return std::isfinite(multiplier);
  }

  void drop(int index) {
    x_[index] = 0.0;
    blocked_[index] = true;
    drop_zeros();
  }

  // Moves x to z if z > 0 on the free set (true); otherwise as far toward z as x ≥ 0 allows,
  // dropping the index that blocks the step and any other that reaches 0 (false).
  bool step_inside(const std::vector<double>& z) {
    double step = 1.0;
    int blocking = -1;
    for (size_t i = 0; i < free_.size(); ++i) {
      const double xi = x_[free_[i]];
      if (z[i] > 0.0) continue;
      const double reach = std::max(0.0, xi / (xi - z[i]));
      if (blocking < 0 || reach < step) step = reach, blocking = free_[i];
    }
    bool moved = false;
    for (size_t i = 0; i < free_.size(); ++i) {
      const double next = x_[free_[i]] + step * (z[i] - x_[free_[i]]);
      moved = moved || next != x_[free_[i]];
      x_[free_[i]] = next;
    }
    if (moved) blocked_.assign(n_, false);
    if (blocking < 0) return true;
    x_[blocking] = 0.0;
    drop_zeros();
    return false;
  }

  // Removes from the free set the indices at 0 and refactorises H[F, F]. An index dropped with
  // no step at all was just added against rounding: it stays out until x moves.
  void drop_zeros() {
    std::vector<int> kept;
    for (int index : free_) {
      if (x_[index] > 0.0) {
        kept.push_back(index);
      } else {
        x_[index] = 0.0;
        is_free_[index] = false;
        blocked_[index] = true;
      }
    }
    free_.clear();
    factor_.clear();
    for (int index : kept) add(index);
  }

  // Frees the fixed index whose KKT multiplier ∇_i − μ is most negative beyond its rounding
  // bound; false when there is none (x is optimal).
  bool add_most_violated() {
    int best = -1;
    double best_violation = 0.0;
    for (int i = 0; i < n_; ++i) {
      if (is_free_[i] || blocked_[i] || !included(i)) continue;
      double gradient = p_.linear[i], scale = std::abs(p_.linear[i]) + std::abs(multiplier_);
      for (int k : free_) gradient += h(i, k) * x_[k], scale += std::abs(h(i, k) * x_[k]);
      const double violation = gradient - multiplier_;
      if (violation < -4.0 * n_ * kEps * scale && violation < best_violation) {
        best = i;
        best_violation = violation;
      }
    }
    if (best < 0) return false;
    add(best);
    return true;
  }

  const QuadraticProgram& p_;
  int n_;
  std::vector<double> x_;
  std::vector<bool> is_free_, blocked_;
  std::vector<int> free_;
  GrowingCholesky factor_;
  double multiplier_ = 0.0;
};

}  // namespace

QpSolution solve_qp(const QuadraticProgram& problem) { return ActiveSet(problem).run(); }

}  // namespace emtl::solvers
