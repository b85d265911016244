// Small dense linear algebra in double for the T×T solvers: a growable Cholesky factor and the
// symmetric eigen-decompositions. Torch-free; matrices are row-major std::vector<double>.
#pragma once

#include <vector>

namespace emtl::solvers {

// The Cholesky factor L (lower, row-major in a capacity×capacity buffer) of a principal
// submatrix H[F, F] that grows one index at a time: appending costs O(k²), not a refactorisation.
class GrowingCholesky {
 public:
  explicit GrowingCholesky(int capacity);

  int size() const { return size_; }
  void clear() { size_ = 0; }
  // Appends the row/column of H[F ∪ {j}, F ∪ {j}]: `column` holds H[F, j] in F's order,
  // `diagonal` is H[j, j]. A pivot below `floor` (rounding has made H[F ∪ {j}] singular or
  // slightly indefinite) is raised to it, which perturbs H along one direction by at most that.
  void append(const double* column, double diagonal, double floor);
  // x ← (L Lᵀ)⁻¹ x for x of length size().
  void solve(double* x) const;

 private:
  int capacity_;
  int size_ = 0;
  std::vector<double> factor_;
};

// Eigenvalues (ascending) and orthonormal eigenvectors (the columns of `vectors`, row-major n×n)
// of the symmetric n×n `matrix` (its lower triangle is read). Defined with the CPU kernels
// (cpu/symmetric_eigh.cpp: LAPACK's dsyevd, as torch links it).
void symmetric_eigh(int n, std::vector<double> matrix, std::vector<double>& values, std::vector<double>& vectors);

// The same by cyclic Jacobi rotations, each skipped once its off-diagonal entry is below eps of
// the geometric mean of its two diagonal entries. Slower than dsyevd, but on a positive
// semi-definite matrix every eigenvalue comes out accurate relative to itself as long as
// D^(-1/2) G D^(-1/2) (D = diag(G)) is well conditioned on its range, where dsyevd's error is
// eps·λ_max for all: what Aligned-MTL needs when the tasks' gradient norms differ by orders.
void jacobi_eigh(int n, std::vector<double> matrix, std::vector<double>& values, std::vector<double>& vectors);

}  // namespace emtl::solvers
