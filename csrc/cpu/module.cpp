// flowkern._C: importing it runs the static TORCH_LIBRARY registrations of
// the CPU kernels (the pattern of pytorch/extension-cpp). It has no Python
// functions of its own.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
}
