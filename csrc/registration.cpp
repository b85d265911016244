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

#include <cstring>

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

namespace {

// A name of Python's (a pass, a dtype) and the C++ value it stands for.
template <typename T>
struct Named {
  const char* name;
  T value;
};
constexpr Named<emtl::cpu::Pass> kPassNames[] = {
    {"gram", emtl::cpu::Pass::kGram}, {"sq_norms", emtl::cpu::Pass::kSqNorms}, {"combine", emtl::cpu::Pass::kCombine}};
constexpr Named<emtl::Storage> kDtypeNames[] = {{"float32", emtl::Storage::kFloat32},
                                                {"bfloat16", emtl::Storage::kBFloat16},
                                                {"float16", emtl::Storage::kFloat16}};

template <typename T, size_t N>
const T* find_named(const Named<T> (&names)[N], const char* name) {
  for (const Named<T>& named : names) {
    if (std::strcmp(named.name, name) == 0) return &named.value;
  }
  return nullptr;
}

// _C.cpu_pass_isa(pass, dtype, num_tasks): the CPU kernel variant that pass runs on.
PyObject* cpu_pass_isa(PyObject*, PyObject* args) {
  const char* pass_name = nullptr;
  const char* dtype_name = nullptr;
  long long num_tasks = 0;
  if (!PyArg_ParseTuple(args, "ssL", &pass_name, &dtype_name, &num_tasks)) return nullptr;
  const emtl::cpu::Pass* pass = find_named(kPassNames, pass_name);
  const emtl::Storage* storage = find_named(kDtypeNames, dtype_name);
  if (pass == nullptr || storage == nullptr || num_tasks < 1) {
    PyErr_Format(PyExc_ValueError,
                 "cpu_pass_isa(pass, dtype, num_tasks) takes a pass of gram, sq_norms or combine, a dtype of "
                 "float32, bfloat16 or float16 and num_tasks >= 1; got (%s, %s, %lld)",
                 pass_name, dtype_name, num_tasks);
    return nullptr;
  }
  return PyUnicode_FromString(emtl::cpu::pass_kernel_isa(*pass, *storage, num_tasks));
}

PyMethodDef module_methods[] = {
    {"cpu_pass_isa", cpu_pass_isa, METH_VARARGS,
     "cpu_pass_isa(pass, dtype, num_tasks) -> str: the CPU kernel variant the pass ('gram', 'sq_norms' or "
     "'combine') runs on for a J of that dtype ('float32', 'bfloat16' or 'float16') and T."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// The module holds two facts about the build and the per-pass CPU variant; importing it runs the
// registrations above.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Custom ops torch.ops.emtl_kernels.* (CPU kernels; CUDA kernels when with_cuda).",
      -1,
      module_methods,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#if defined(EMTL_WITH_CUDA)
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0 ||
      PyModule_AddStringConstant(module, "cpu_isa", emtl::cpu::widest_kernel_isa()) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
