// Python entry of an ISA module (attention_ext._cpu_avx2, _cpu_avx512): it only hands
// its kernel table to attention_ext._C, which registers the ops.
#include <Python.h>

#include "kernels.h"

#ifndef AE_MODULE_NAME
#error "AE_MODULE_NAME must name the extension module"
#endif
#define AE_CAT2(a, b) a##b
#define AE_CAT(a, b) AE_CAT2(a, b)
#define AE_STR2(x) #x
#define AE_STR(x) AE_STR2(x)

static struct PyModuleDef ae_module = {PyModuleDef_HEAD_INIT, AE_STR(AE_MODULE_NAME),
                                       "CPU kernels of attention_ext for one ISA", -1, nullptr};

PyMODINIT_FUNC AE_CAT(PyInit_, AE_MODULE_NAME)(void) {
  PyObject* m = PyModule_Create(&ae_module);
  if (!m) return nullptr;
  auto* table = const_cast<attention_ext::cpu::KernelTable*>(attention_ext::cpu::kernel_table());
  PyObject* cap = PyCapsule_New(table, "attention_ext.cpu.KernelTable", nullptr);
  if (!cap || PyModule_AddObject(m, "kernel_table", cap) < 0) {
    Py_XDECREF(cap);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
