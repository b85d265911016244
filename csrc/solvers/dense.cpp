#include "dense.h"

#include <cmath>

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
