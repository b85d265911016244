// The Gram-based weightings' solves in double, torch-free: (G, options) -> T weights.
//
// `gram` is G, n×n row-major, already widened to double. `eps` is the machine epsilon of the
// weights' dtype, which sizes the rank cuts (the arithmetic is double whatever it is). Each
// function follows the Python method of the same name in emtl_kernels/weightings/ (degenerate
// inputs included); csrc/README.md states each algorithm.
#pragma once

#include <vector>

namespace emtl::solvers {

using Vector = std::vector<double>;

// v_b = argmin vᵀG̃v subject to v ≥ u_b for each row u_b of `preferences` (rows × n), with
// G̃ = G / tr(G) (0 when tr(G) ≤ 0 or < norm_eps) + reg_eps·I. Returns rows × n.
Vector project_onto_dual_cone(int n, const Vector& gram, const Vector& preferences, int rows, double norm_eps,
                              double reg_eps);

// argmin over the simplex of αᵀGα on the tasks with G_ii > 0; the others get the mean weight.
Vector mgda_weights(int n, const Vector& gram);

// π + (r / ‖g_w‖) w, w the minimiser over the simplex of g_wᵀg_0 + r‖g_w‖ (r = c‖g_0‖), on G / tr(G)
// with a ridge of 2·n·gram_eps of its diagonal (gram_eps: the rounding of G's dtype).
Vector cagrad_weights(int n, const Vector& gram, double c, double gram_eps);

// α > 0 with α_i (Gα)_i = 1 (on G + reg_eps·diag(G)), then clipped to ‖Jᵀα‖ ≤ max_norm when
// max_norm > 0.
Vector nash_mtl_weights(int n, const Vector& gram, double reg_eps, double max_norm, int iterations);

// α > 0 with (G̃α)_i = α_i^(−1/p) on G̃ = G / tr(G) with G̃_ii·(1 + reg_eps), by at most `iterations`
// Newton steps in log α, then scaled back to G: α·tr(G)^(−p/(p+1)).
Vector fairgrad_weights(int n, const Vector& gram, double p, double reg_eps, int iterations);

// PCD's weights (1, μ)·s·r from the scales s: μ ≥ 0 solves the dual min ½μᵀSμ − bᵀμ on N = G∘ssᵀ
// (S = N[1:, 1:], b_j = τ_j S_jj − N_j0), r rescales the update to ‖g_0‖. `gram_eps` (the rounding
// of G's dtype) sizes the test of a zero update.
Vector pcd_weights(int n, const Vector& gram, const Vector& scales, const Vector& taus, double gram_eps);

// D⁻¹ C⁺ 1 normalised to sum 1 (C the correlation matrix, D the gradient norms).
Vector imtl_g_weights(int n, const Vector& gram, double eps);

// ConFIG's s·D⁻¹C⁺p with s = cᵀCβ / βᵀCβ, β = C⁺p on the active tasks (rank cut at double's eps).
Vector config_weights(int n, const Vector& gram, const Vector& preference);

// PCGrad's weights: the column sums of the T projected gradients' coefficients, row i meeting the
// other tasks in increasing order_keys[i][j] (n×n) and projecting out each one it conflicts with.
Vector pcgrad_weights(int n, const Vector& gram, const Vector& order_keys);

// GradVac's weights, row i meeting the others as PCGrad's do, each correction toward the target
// φ̂_ij in `targets` (n×n), which the call moves to (1 − beta)·φ̂_ij + beta·φ_ij in place.
Vector gradvac_weights(int n, const Vector& gram, const Vector& order_keys, Vector& targets, double beta,
                       double eps);

enum class ScaleMode { kMin, kMedian, kRmse };

// √σ · V Λ^{-1/2} Vᵀ π on the kept eigenpairs of G / tr(G).
Vector aligned_mtl_weights(int n, const Vector& gram, ScaleMode scale_mode, double eps);

}  // namespace emtl::solvers
