#include "dense.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace emtl::solvers {

GrowingCholesky::GrowingCholesky(int capacity)
    : capacity_(capacity), factor_(static_cast<size_t>(capacity) * capacity, 0.0) {}

void GrowingCholesky::append(const double* column, double diagonal, double floor) {
  double* row = &factor_[static_cast<size_t>(size_) * capacity_];
  double pivot = diagonal;
  for (int i = 0; i < size_; ++i) {
    const double* factor_row = &factor_[static_cast<size_t>(i) * capacity_];
    double value = column[i];
    for (int k = 0; k < i; ++k) value -= factor_row[k] * row[k];
    row[i] = value / factor_row[i];
    pivot -= row[i] * row[i];
  }
  // `!(pivot >= floor)` also catches a NaN pivot.
  row[size_] = std::sqrt(!(pivot >= floor) ? floor : pivot);
  ++size_;
}

void GrowingCholesky::solve(double* x) const {
  for (int i = 0; i < size_; ++i) {
    const double* row = &factor_[static_cast<size_t>(i) * capacity_];
    double value = x[i];
    for (int k = 0; k < i; ++k) value -= row[k] * x[k];
    x[i] = value / row[i];
  }
  for (int i = size_ - 1; i >= 0; --i) {
    double value = x[i];
    for (int k = i + 1; k < size_; ++k) value -= factor_[static_cast<size_t>(k) * capacity_ + i] * x[k];
    x[i] = value / factor_[static_cast<size_t>(i) * capacity_ + i];
  }
}

}  // namespace emtl::solvers

namespace emtl::solvers {
namespace {

constexpr int kMaxJacobiSweeps = 64;

}  // namespace

void jacobi_eigh(int n, std::vector<double> a, std::vector<double>& values, std::vector<double>& vectors) {
  const auto at = [n](std::vector<double>& m, int i, int j) -> double& { return m[static_cast<size_t>(i) * n + j]; };
  for (int i = 0; i < n; ++i) {
    for (int j = i + 1; j < n; ++j) at(a, i, j) = at(a, j, i);
  }
  // The rotations accumulate in the rows of `basis`: row k ends as eigenvector k.
  std::vector<double> basis(static_cast<size_t>(n) * n, 0.0);
  for (int i = 0; i < n; ++i) at(basis, i, i) = 1.0;
  const double eps = std::numeric_limits<double>::epsilon();
  for (int sweep = 0; sweep < kMaxJacobiSweeps; ++sweep) {
    bool rotated = false;
    for (int p = 0; p < n - 1; ++p) {
      for (int q = p + 1; q < n; ++q) {
        const double apq = at(a, p, q), app = at(a, p, p), aqq = at(a, q, q);
        // Relative to the two diagonal entries (Demmel & Veselić 1992): what keeps the small
        // eigenvalues of a graded G accurate to their own size, not to eps·‖G‖.
        if (!(std::abs(apq) > eps * std::sqrt(std::abs(app * aqq)))) continue;
        rotated = true;
        // Golub & Van Loan, Algorithm 8.5.1 (sym.schur2): the smaller of the two angles.
        const double tau = (aqq - app) / (2.0 * apq);
        const double t = (tau >= 0 ? 1.0 : -1.0) / (std::abs(tau) + std::hypot(1.0, tau));
        const double c = 1.0 / std::sqrt(1.0 + t * t), s = t * c;
        for (int k = 0; k < n; ++k) {
          if (k == p || k == q) continue;
          const double akp = at(a, k, p), akq = at(a, k, q);
          at(a, k, p) = at(a, p, k) = c * akp - s * akq;
          at(a, k, q) = at(a, q, k) = s * akp + c * akq;
        }
        at(a, p, p) = app - t * apq;
        at(a, q, q) = aqq + t * apq;
        at(a, p, q) = at(a, q, p) = 0.0;
        double* row_p = &at(basis, p, 0);
        double* row_q = &at(basis, q, 0);
        for (int k = 0; k < n; ++k) {
          const double vp = row_p[k], vq = row_q[k];
          row_p[k] = c * vp - s * vq;
          row_q[k] = s * vp + c * vq;
        }
      }
    }
    if (!rotated) break;
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int i, int j) { return at(a, i, i) < at(a, j, j); });
  values.assign(n, 0.0);
  vectors.assign(static_cast<size_t>(n) * n, 0.0);
  for (int k = 0; k < n; ++k) {
    values[k] = at(a, order[k], order[k]);
    for (int i = 0; i < n; ++i) vectors[static_cast<size_t>(i) * n + k] = at(basis, order[k], i);
  }
}

}  // namespace emtl::solvers
