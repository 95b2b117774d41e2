// The Python module pyodlog._C. Importing it loads every operator registered
// with TORCH_LIBRARY_FRAGMENT(pyodlog, ...) in this library; the module itself
// only reports how it was built (plain C API: no pybind11 compile cost).
#include <Python.h>

#ifndef PYODLOG_TORCH_VERSION
#error "setup.py defines PYODLOG_TORCH_VERSION"
#endif

#ifdef PYODLOG_WITH_CUDA
namespace pyodlog {
int cuda_runtime_version_compiled();  // csrc/ops/cuda/build_info.cu
}
#endif

namespace {

PyObject* build_info(PyObject* /*self*/, PyObject* /*args*/) {
#ifdef PYODLOG_WITH_CUDA
  const int cuda_version = pyodlog::cuda_runtime_version_compiled();
  return Py_BuildValue(
      "{s:O,s:s,s:i,s:s}",
      "cuda", Py_True,
      "cuda_archs", PYODLOG_CUDA_ARCHS,
      "cuda_runtime", cuda_version,
      "torch", PYODLOG_TORCH_VERSION);
#else
  return Py_BuildValue(
      "{s:O,s:s,s:O,s:s}",
      "cuda", Py_False,
      "cuda_archs", "",
      "cuda_runtime", Py_None,
      "torch", PYODLOG_TORCH_VERSION);
#endif
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "How this extension was built: {'cuda', 'cuda_archs', 'cuda_runtime', 'torch'}."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "pyodlog's compiled operators.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&module_def);
}
