// Exact primal active-set solver for the small dense convex QPs of the weightings. Torch-free.
//
//     minimise ½ xᵀHx + qᵀx   subject to   x ≥ 0   (and Σ_i x_i = 1 when `simplex`)
//
// H is symmetric positive semi-definite, n×n row-major; only the indices with `included[i]`
// take part (the others stay 0). The method is Lawson & Hanson's (NNLS, 1974) on a QP: from a
// feasible point (0, or the best vertex of the simplex) with free set F, it solves the
// equality-constrained problem on F (x_i = 0 off F) through a Cholesky factor of H[F, F] that
// grows by one row per added index; if that solution leaves the orthant it steps to the boundary
// and drops the indices that reach 0 (refactorising); otherwise it moves there
// and adds the index whose KKT multiplier (∇_i − μ, μ the simplex multiplier, 0 for the orthant)
// is most negative, until none is below rounding. Each pass strictly lowers the objective, so
// it ends in finitely many passes; a cap of 4n + 16 passes guards against rounding cycles.
#pragma once

#include <vector>

namespace emtl::solvers {

struct QuadraticProgram {
  const double* hessian;  // H, n×n
  const double* linear;   // q, n
  int n;
  bool simplex;
  // Which indices take part; empty: all.
  std::vector<bool> included;
};

// The solution and its free set.
struct QpSolution {
  std::vector<double> x;
  std::vector<int> free_set;
};

QpSolution solve_qp(const QuadraticProgram& problem);

}  // namespace emtl::solvers
