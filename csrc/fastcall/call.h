// The dispatcher call both of flowkern._fastcall's callers make: the op's
// FastOp (fastcall.cpp) and the public functions' entries (entries.cpp).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>

#include <stdexcept>

namespace fk_fastcall {

// An exact int (bool, a subclass, is not one) within int64; false otherwise,
// which leaves the value and its error to the caller's fallback.
inline bool int64_of(PyObject* o, int64_t& v) {
  if (!PyLong_CheckExact(o)) return false;
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow != 0 || (x == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  v = static_cast<int64_t>(x);
  return true;
}

// op.callBoxed(stack) with the GIL released, as torch's binding calls; false
// with the Python error set for what pybind11 would make a ValueError of
// (torch's binding <= 2.14); other C++ errors propagate to the caller's
// HANDLE_TH_ERRORS.
//
// A reference to every tensor argument is kept until the GIL is back. The
// stable ABI's boxed kernel moves each argument off the stack into a handle
// of its own (a Tensor[]'s elements too, out of the list) and drops it inside
// the call; a tensor whose last C++ reference goes there releases its Python
// object (TensorImpl's PyObject slot), which takes the GIL: one GIL round
// trip per tensor argument, ~0.05 us each (docs/build.md "Host time"). With
// these references the last one goes after the call, under the GIL, as in
// torch's own binding, whose parsed arguments outlive the call.
inline bool call_boxed(const c10::OperatorHandle& op, torch::jit::Stack& stack) {
  c10::SmallVector<c10::IValue, 16> keep;
  for (const c10::IValue& v : stack) {
    if (v.isTensor()) {
      keep.push_back(v);
    } else if (v.isTensorList()) {
      const c10::List<at::Tensor> list = v.toTensorList();
      for (size_t i = 0; i < list.size(); ++i) keep.emplace_back(list.get(i));
    }
  }
  try {
    pybind11::gil_scoped_release no_gil;
    op.callBoxed(stack);
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return false;
  }
  return true;
}

}  // namespace fk_fastcall
