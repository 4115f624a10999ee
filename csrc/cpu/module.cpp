// flowkern._C: importing it runs the static STABLE_TORCH_LIBRARY
// registrations of the kernels (the pattern of pytorch/extension-cpp). It is
// built on CPython's limited API (one abi3 module for every CPython >= 3.10)
// and torch's stable ABI, so it loads into every torch from the target
// version up (docs/build.md). Its one attribute, TORCH_VERSION, names the
// torch it was built against: flowkern loads the version-bound companion
// flowkern._nograd only into that torch (flowkern/_native.py).
#include <Python.h>

#ifndef FK_BUILD_TORCH_VERSION
#error "setup.py defines FK_BUILD_TORCH_VERSION"
#endif

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&def);
  if (m != nullptr && PyModule_AddStringConstant(m, "TORCH_VERSION", FK_BUILD_TORCH_VERSION) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}
