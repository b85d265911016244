// The ops' schemas, and the Python module `emtl_kernels._C` whose import loads them.
//
// The ops are plain torch.library custom ops: torch.ops.emtl_kernels.<name>, with the names and
// schemas of the op contract both op backends share (OPS in emtl_kernels/backends/contract.py; a
// test holds these to it). Their CPU and CUDA kernels are registered by cpu/ops_cpu.cpp and
// cuda/ops_cuda.cpp, their fake (meta) kernels in Python (emtl_kernels/backends/native.py). The
// pieces of J come as one flat list, task-major: pieces[i*K + k] is task i's gradient on shared
// tensor k.
#include <Python.h>
#include <torch/library.h>

#include "cpu/ops_cpu.h"

TORCH_LIBRARY(emtl_kernels, m) {
  m.def("task_gram(Tensor[] pieces, int num_tasks) -> Tensor");
  m.def("task_sq_norms(Tensor[] pieces, int num_tasks) -> Tensor");
  m.def("weighted_combine_(Tensor[] pieces, int num_tasks, Tensor weights, Tensor(a!)[] outs, bool accumulate) -> ()");
}

// The weightings' T×T solves (CPU kernels in cpu/solver_ops.cpp, fake kernels in
// emtl_kernels/weightings/_compiled.py, which holds these schemas too). Weights come back in
// float32, or float64 when the losses are (the preferences' dtype for the dual-cone projection).
TORCH_LIBRARY(emtl_solvers, m) {
  m.def("project_onto_dual_cone(Tensor gram, Tensor preferences, float norm_eps, float reg_eps) -> Tensor");
  m.def("mgda_weights(Tensor losses, Tensor gram) -> Tensor");
  m.def("cagrad_weights(Tensor losses, Tensor gram, float c) -> Tensor");
  m.def("nash_mtl_weights(Tensor losses, Tensor gram, float reg_eps, float? max_norm, int iterations) -> Tensor");
  m.def(
      "fairgrad_weights(Tensor losses, Tensor gram, float p, float reg_eps, float fallback_reg_eps, int iterations) -> "
      "Tensor");
  m.def("pcd_weights(Tensor losses, Tensor gram, Tensor scales, Tensor taus) -> Tensor");
  m.def("pcgrad_weights(Tensor losses, Tensor gram, Tensor order_keys) -> Tensor");
  m.def(
      "gradvac_weights(Tensor losses, Tensor gram, Tensor order_keys, Tensor targets, float beta, float eps) -> "
      "(Tensor, Tensor)");
  m.def("imtl_g_weights(Tensor losses, Tensor gram) -> Tensor");
  m.def("config_weights(Tensor losses, Tensor gram, Tensor? preference) -> Tensor");
  m.def("aligned_mtl_weights(Tensor losses, Tensor gram, str scale_mode) -> Tensor");
}

extern "C" {
// The module itself holds two facts about the build; importing it runs the registrations above.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Custom ops torch.ops.emtl_kernels.* (CPU kernels; CUDA kernels when with_cuda).",
      -1,
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#if defined(EMTL_WITH_CUDA)
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0 ||
      PyModule_AddStringConstant(module, "cpu_isa", emtl::cpu::kernel_isa()) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
