// symmetric_eigh of csrc/solvers/dense.h on LAPACK's dsyevd (divide and conquer), the routine
// behind torch.linalg.eigh on the CPU: libtorch exports it from the LAPACK it is built with.
#include <c10/util/Exception.h>

#include <vector>

#include "../solvers/dense.h"

extern "C" void dsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* lda, double* w,
                        double* work, const int* lwork, int* iwork, const int* liwork, int* info);
// MKL's, where torch links MKL (weak: absent from other LAPACKs).
extern "C" int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));

namespace emtl::solvers {

void symmetric_eigh(int n, std::vector<double> matrix, std::vector<double>& values, std::vector<double>& vectors) {
  // Row-major lower triangle = column-major upper triangle.
  const char jobz = 'V', uplo = 'U';
  const int lwork = 1 + 6 * n + 2 * n * n, liwork = 3 + 5 * n;
  std::vector<double> work(lwork);
  std::vector<int> iwork(liwork);
  values.assign(n, 0.0);
  int info = 0;
  // On a T×T matrix MKL's threads cost more than they save (several times more on a loaded machine).
  const int previous_threads = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
  dsyevd_(&jobz, &uplo, &n, matrix.data(), &n, values.data(), work.data(), &lwork, iwork.data(), &liwork, &info);
  if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_threads);
  TORCH_CHECK(info == 0, "emtl_solvers: dsyevd failed to converge (info ", info, ")");
  // LAPACK leaves eigenvector k in column k of the column-major matrix.
  vectors.assign(static_cast<size_t>(n) * n, 0.0);
  for (int k = 0; k < n; ++k) {
    for (int i = 0; i < n; ++i) vectors[static_cast<size_t>(i) * n + k] = matrix[static_cast<size_t>(k) * n + i];
  }
}

}  // namespace emtl::solvers
