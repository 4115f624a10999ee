// flowkern._nograd: the Autograd-key kernel of the no-derivative ops
// (nograd.cpp), on torch's regular C++ API, which the stable ABI cannot
// express (a redispatch below autograd, forward-mode tangents, version
// counters). Bound to the exact torch it was built against, so flowkern
// imports it only there (flowkern/_native.py); under any other torch the
// same rules run as a Python kernel (flowkern/ops/_nograd.py).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__nograd(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_nograd", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
}
