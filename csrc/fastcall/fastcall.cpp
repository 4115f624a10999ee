// flowkern._fastcall: a Python callable per flowkern:: overload that does
// what torch's own operator binding (OpOverload._op) does for the calls the
// public functions make, in a fraction of its host time (docs/build.md
// "flowkern._fastcall").
//
// torch's binding parses every argument against the schema in a generic way
// (torch::jit::createStackForSchema: type inference, __torch_function__
// collection, kwargs) before the boxed dispatcher call; on the 11-argument
// steps that is ~2 us of the ~4 us a call costs on 8x64 tensors. The public
// functions always call with positional arguments of the exact schema
// types, so the conversion here is one switch per argument, and then the
// same Dispatcher::callBoxed (profiler, Autograd key, every backend key), with
// the GIL released as torch's binding does.
//
// Anything else — a keyword, a tensor subclass (FakeTensor, a subclass with
// __torch_function__), an active TorchFunctionMode, an int where a float is
// expected, a Python scalar of an unexpected type — goes to the fallback
// (the overload's own `_op`) with the same arguments: the result and the
// errors are torch's binding's. Built on torch's regular C++ and Python API
// and CPython's full API, so it serves exactly the torch and CPython it was
// built for; flowkern imports it only there (flowkern/backend.py).
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <structmember.h>

#include <memory>
#include <stdexcept>
#include <vector>

#include "call.h"
#include "entries.h"

#ifndef FK_BUILD_TORCH_VERSION
#error "setup.py defines FK_BUILD_TORCH_VERSION"
#endif

namespace {

using fk_fastcall::int64_of;

enum class Arg : uint8_t { Tensor, OptionalTensor, TensorList, FloatList, Int, Float, Bool };
enum class Ret : uint8_t { None, Tensor, Tensors, TensorList };

// The argument kinds of a schema, or false when one is not a kind above.
bool argument_kinds(const c10::FunctionSchema& schema, std::vector<Arg>& kinds) {
  for (const c10::Argument& a : schema.arguments()) {
    const c10::TypePtr& ty = a.real_type();
    switch (ty->kind()) {
      case c10::TypeKind::TensorType: kinds.push_back(Arg::Tensor); break;
      case c10::TypeKind::IntType: kinds.push_back(Arg::Int); break;
      case c10::TypeKind::FloatType: kinds.push_back(Arg::Float); break;
      case c10::TypeKind::BoolType: kinds.push_back(Arg::Bool); break;
      case c10::TypeKind::OptionalType:
        if (ty->expectRef<c10::OptionalType>().getElementType()->kind() !=
            c10::TypeKind::TensorType)
          return false;
        kinds.push_back(Arg::OptionalTensor);
        break;
      case c10::TypeKind::ListType: {
        const auto elem = ty->expectRef<c10::ListType>().getElementType()->kind();
        if (elem == c10::TypeKind::TensorType) kinds.push_back(Arg::TensorList);
        else if (elem == c10::TypeKind::FloatType) kinds.push_back(Arg::FloatList);
        else return false;
        break;
      }
      default: return false;
    }
  }
  return true;
}

// How the schema's returns come back: nothing, one tensor, a tuple of
// tensors, or a list (Tensor[]); false for anything else.
bool return_kind(const c10::FunctionSchema& schema, Ret& ret) {
  const auto& returns = schema.returns();
  if (returns.empty()) { ret = Ret::None; return true; }
  for (const c10::Argument& r : returns)
    if (r.real_type()->kind() != c10::TypeKind::TensorType &&
        !(returns.size() == 1 && r.real_type()->kind() == c10::TypeKind::ListType &&
          r.real_type()->expectRef<c10::ListType>().getElementType()->kind() ==
              c10::TypeKind::TensorType))
      return false;
  if (returns.size() > 1) ret = Ret::Tensors;
  else ret = returns[0].real_type()->kind() == c10::TypeKind::ListType ? Ret::TensorList
                                                                      : Ret::Tensor;
  return true;
}

struct FastOp {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  c10::OperatorHandle* op;
  std::vector<Arg>* kinds;
  Ret ret;
  PyObject* fallback;  // the overload's _op: every call this one does not take
  PyObject* name;
  Py_ssize_t fallbacks;  // calls sent to the fallback (tests: the public calls take none)
};

// A plain torch.Tensor (no subclass, so no __torch_function__ of its own).
inline bool plain_tensor(PyObject* o) { return THPVariable_CheckExact(o); }

// The items of an exact list or tuple (a schema list's Python value); false
// for anything else. (An empty list's item array may be null: not a test.)
bool items_of(PyObject* o, PyObject**& items, Py_ssize_t& n) {
  if (!PyList_CheckExact(o) && !PyTuple_CheckExact(o)) return false;
  n = PySequence_Fast_GET_SIZE(o);
  items = PySequence_Fast_ITEMS(o);
  return true;
}

// "name.overload", or "name" for the default overload: a caller's repr.
PyObject* op_name(const char* name, const char* overload) {
  return *overload ? PyUnicode_FromFormat("%s.%s", name, overload) : PyUnicode_FromString(name);
}

// One argument onto the stack; false sends the whole call to the fallback.
bool push(Arg kind, PyObject* o, torch::jit::Stack& stack) {
  switch (kind) {
    case Arg::OptionalTensor:
      if (o == Py_None) { stack.emplace_back(); return true; }
      [[fallthrough]];
    case Arg::Tensor:
      if (!plain_tensor(o)) return false;
      stack.emplace_back(THPVariable_Unpack(o));
      return true;
    case Arg::TensorList: {
      PyObject** items = nullptr;
      Py_ssize_t n = 0;
      if (!items_of(o, items, n)) return false;
      c10::List<at::Tensor> list;
      list.reserve(n);
      for (Py_ssize_t i = 0; i < n; ++i) {
        if (!plain_tensor(items[i])) return false;
        list.push_back(THPVariable_Unpack(items[i]));
      }
      stack.emplace_back(std::move(list));
      return true;
    }
    case Arg::FloatList: {
      PyObject** items = nullptr;
      Py_ssize_t n = 0;
      if (!items_of(o, items, n)) return false;
      c10::List<double> list;
      list.reserve(n);
      for (Py_ssize_t i = 0; i < n; ++i) {
        if (!PyFloat_CheckExact(items[i])) return false;
        list.push_back(PyFloat_AS_DOUBLE(items[i]));
      }
      stack.emplace_back(std::move(list));
      return true;
    }
    case Arg::Int: {
      int64_t v = 0;
      if (!int64_of(o, v)) return false;
      stack.emplace_back(v);
      return true;
    }
    case Arg::Float:
      if (!PyFloat_CheckExact(o)) return false;
      stack.emplace_back(PyFloat_AS_DOUBLE(o));
      return true;
    case Arg::Bool:
      if (o != Py_True && o != Py_False) return false;
      stack.emplace_back(o == Py_True);
      return true;
  }
  return false;
}

PyObject* wrap_returns(Ret ret, torch::jit::Stack& stack) {
  switch (ret) {
    case Ret::None: Py_RETURN_NONE;
    case Ret::Tensor: return THPVariable_Wrap(std::move(stack[0]).toTensor());
    case Ret::Tensors: {
      PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(stack.size()));
      if (tuple == nullptr) return nullptr;
      for (size_t i = 0; i < stack.size(); ++i) {
        PyObject* t = THPVariable_Wrap(std::move(stack[i]).toTensor());
        if (t == nullptr) { Py_DECREF(tuple); return nullptr; }
        PyTuple_SET_ITEM(tuple, static_cast<Py_ssize_t>(i), t);
      }
      return tuple;
    }
    case Ret::TensorList: {
      const c10::List<at::Tensor> tensors = std::move(stack[0]).toTensorList();
      PyObject* list = PyList_New(static_cast<Py_ssize_t>(tensors.size()));
      if (list == nullptr) return nullptr;
      for (size_t i = 0; i < tensors.size(); ++i) {
        PyObject* t = THPVariable_Wrap(tensors.get(i));
        if (t == nullptr) { Py_DECREF(list); return nullptr; }
        PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), t);
      }
      return list;
    }
  }
  Py_RETURN_NONE;
}

PyObject* fast_call(PyObject* self_, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  auto* self = reinterpret_cast<FastOp*>(self_);
  const std::vector<Arg>& kinds = *self->kinds;
  const Py_ssize_t n = PyVectorcall_NARGS(nargsf);
  // A TorchFunctionMode sees the call through torch's binding only.
  if (kwnames == nullptr && static_cast<size_t>(n) == kinds.size() &&
      !at::impl::torch_function_mode_enabled()) {
    torch::jit::Stack stack;
    stack.reserve(kinds.size());
    bool taken = true;
    for (Py_ssize_t i = 0; i < n && taken; ++i) taken = push(kinds[i], args[i], stack);
    if (taken) {
      HANDLE_TH_ERRORS
      if (!fk_fastcall::call_boxed(*self->op, stack)) return nullptr;
      return wrap_returns(self->ret, stack);
      END_HANDLE_TH_ERRORS
    }
  }
  ++self->fallbacks;
  return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

void fast_dealloc(PyObject* s) {
  auto* self = reinterpret_cast<FastOp*>(s);
  delete self->op;
  delete self->kinds;
  Py_XDECREF(self->fallback);
  Py_XDECREF(self->name);
  Py_TYPE(s)->tp_free(s);
}

PyObject* fast_repr(PyObject* s) {
  return PyUnicode_FromFormat("<flowkern._fastcall %U>", reinterpret_cast<FastOp*>(s)->name);
}

PyMemberDef fast_members[] = {
    {"fallbacks", T_PYSSIZET, offsetof(FastOp, fallbacks), READONLY,
     "how many calls went to the fallback (torch's own binding)"},
    {"fallback", T_OBJECT, offsetof(FastOp, fallback), READONLY, "the overload's _op"},
    {nullptr, 0, 0, 0, nullptr}};

PyTypeObject FastOpType = {PyVarObject_HEAD_INIT(nullptr, 0) "flowkern._fastcall.FastOp"};

// op(qualified_name, overload_name, fallback) -> a FastOp, or `fallback`
// itself when a schema argument or return is of a kind the switch above
// does not convert.
PyObject* make_op(PyObject*, PyObject* args) {
  const char* name = nullptr;
  const char* overload = nullptr;
  PyObject* fallback = nullptr;
  if (!PyArg_ParseTuple(args, "ssO:op", &name, &overload, &fallback)) return nullptr;
  HANDLE_TH_ERRORS
  const c10::OperatorHandle handle =
      c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
  auto kinds = std::make_unique<std::vector<Arg>>();
  Ret ret = Ret::None;
  if (!argument_kinds(handle.schema(), *kinds) || !return_kind(handle.schema(), ret)) {
    Py_INCREF(fallback);
    return fallback;
  }
  FastOp* self = PyObject_New(FastOp, &FastOpType);
  if (self == nullptr) return nullptr;
  self->vectorcall = fast_call;
  self->op = new c10::OperatorHandle(handle);
  self->kinds = kinds.release();
  self->ret = ret;
  Py_INCREF(fallback);
  self->fallback = fallback;
  self->fallbacks = 0;
  self->name = op_name(name, overload);
  return reinterpret_cast<PyObject*>(self);
  END_HANDLE_TH_ERRORS
}

// ---------------------------------------------------------------------------
// ImplOp: the eager call of a flowkern_triton:: op (a torch.library custom op
// whose kernel is a Python function: the Triton launch). Through the
// dispatcher such a call runs three Python kernels (the custom op's Autograd,
// ADInplaceOrView and backend wrappers) around the function; for a call
// where none of them does anything but pass it on, this calls the function
// itself, after what the ADInplaceOrView wrapper does: bump the version of
// every argument the schema writes (Tensor(a!)).
//
// "Nothing to do" is decided here, conservatively: positional arguments of
// the schema's kinds; every tensor a plain torch.Tensor on CPU or CUDA (no
// subclass, functorch wrapper, meta, sparse, conj/neg view, ...) that needs
// no gradient (grad mode on and requires_grad) and carries no forward-mode
// tangent; a written inference tensor only in inference mode; no
// TorchFunctionMode, no TorchDispatchMode or functorch transform (the
// thread's included dispatch keys are the default ones), and no profiler or
// other RecordFunction observer, which would expect the op's record. Every
// other call goes to the fallback (the overload's own caller), unchanged.

struct ImplOp {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  std::vector<Arg>* kinds;
  std::vector<bool>* writes;  // per argument: the schema writes it (Tensor(a!))
  PyObject* impl;             // the op's Python function
  PyObject* fallback;
  PyObject* name;
  Py_ssize_t fallbacks;
  Py_ssize_t taken;  // calls that ran the function itself (tests: the public calls' path)
};

// Whether the custom op's Python kernels would only pass tensor `o` on.
bool plain_arg(PyObject* o, bool written, bool grad_mode, bool inference_mode) {
  if (!THPVariable_CheckExact(o)) return false;
  const at::Tensor& t = THPVariable_Unpack(o);
  static const c10::DispatchKeySet allowed = [] {
    c10::DispatchKeySet ks;
    for (auto k : {c10::DispatchKey::CPU, c10::DispatchKey::CUDA}) {
      const auto b = c10::toBackendComponent(k);
      ks = ks | c10::DispatchKeySet(k) | c10::getAutogradRelatedKeySetFromBackend(b) |
           c10::getAutocastRelatedKeySetFromBackend(b);
    }
    return ks;
  }();
  // a subset of `allowed` (DispatchKeySet's `-` keeps the backend bits)
  if ((t.key_set() | allowed) != allowed) return false;
  if (written && t.is_inference() && !inference_mode) return false;
  c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (impl->autograd_meta() == nullptr) return true;  // every plain tensor: no grad, no tangent
  if (grad_mode && t.requires_grad()) return false;
  for (uint64_t level = 0; level < 8; ++level)
    if (t._fw_grad(level).defined()) return false;
  return true;
}

bool plain_call(const ImplOp* self, PyObject* const* args) {
  const std::vector<Arg>& kinds = *self->kinds;
  const bool grad_mode = c10::GradMode::is_enabled();
  const bool inference_mode = c10::InferenceMode::is_enabled();
  for (size_t i = 0; i < kinds.size(); ++i) {
    PyObject* o = args[i];
    const bool written = (*self->writes)[i];
    switch (kinds[i]) {
      case Arg::OptionalTensor:
        if (o == Py_None) break;
        [[fallthrough]];
      case Arg::Tensor:
        if (!plain_arg(o, written, grad_mode, inference_mode)) return false;
        break;
      case Arg::TensorList: {
        PyObject** items = nullptr;
        Py_ssize_t n = 0;
        if (!items_of(o, items, n)) return false;
        for (Py_ssize_t j = 0; j < n; ++j)
          if (!plain_arg(items[j], written, grad_mode, inference_mode)) return false;
        break;
      }
      case Arg::FloatList: {
        PyObject** items = nullptr;
        Py_ssize_t n = 0;
        if (!items_of(o, items, n)) return false;
        for (Py_ssize_t j = 0; j < n; ++j)
          if (!PyFloat_CheckExact(items[j])) return false;
        break;
      }
      case Arg::Int: {
        int64_t v = 0;  // beyond int64: the dispatcher's error, not the function's
        if (!int64_of(o, v)) return false;
        break;
      }
      case Arg::Float:
        if (!PyFloat_CheckExact(o)) return false;
        break;
      case Arg::Bool:
        if (o != Py_True && o != Py_False) return false;
        break;
    }
  }
  return true;
}

// The ADInplaceOrView wrapper's version bump of every written tensor.
void bump_written(const ImplOp* self, PyObject* const* args) {
  const std::vector<Arg>& kinds = *self->kinds;
  for (size_t i = 0; i < kinds.size(); ++i) {
    if (!(*self->writes)[i] || args[i] == Py_None) continue;
    auto bump = [](PyObject* o) {
      const at::Tensor& t = THPVariable_Unpack(o);
      if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
    };
    if (kinds[i] == Arg::TensorList) {
      PyObject** items = nullptr;
      Py_ssize_t n = 0;
      items_of(args[i], items, n);  // a list or tuple: plain_call checked it
      for (Py_ssize_t j = 0; j < n; ++j) bump(items[j]);
    } else if (kinds[i] == Arg::Tensor || kinds[i] == Arg::OptionalTensor) {
      bump(args[i]);
    }
  }
}

PyObject* impl_call(PyObject* self_, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  auto* self = reinterpret_cast<ImplOp*>(self_);
  const Py_ssize_t n = PyVectorcall_NARGS(nargsf);
  if (kwnames == nullptr && static_cast<size_t>(n) == self->kinds->size() &&
      !at::impl::torch_function_mode_enabled() &&
      (c10::impl::tls_local_dispatch_key_set().included_ - c10::default_included_set).empty() &&
      !at::hasCallbacks() && plain_call(self, args)) {
    HANDLE_TH_ERRORS
    bump_written(self, args);
    END_HANDLE_TH_ERRORS
    ++self->taken;
    return PyObject_Vectorcall(self->impl, args, nargsf, nullptr);
  }
  ++self->fallbacks;
  return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

void impl_dealloc(PyObject* s) {
  auto* self = reinterpret_cast<ImplOp*>(s);
  delete self->kinds;
  delete self->writes;
  Py_XDECREF(self->impl);
  Py_XDECREF(self->fallback);
  Py_XDECREF(self->name);
  Py_TYPE(s)->tp_free(s);
}

PyObject* impl_repr(PyObject* s) {
  return PyUnicode_FromFormat("<flowkern._fastcall impl %U>", reinterpret_cast<ImplOp*>(s)->name);
}

PyMemberDef impl_members[] = {
    {"fallbacks", T_PYSSIZET, offsetof(ImplOp, fallbacks), READONLY,
     "how many calls went to the fallback (the op through the dispatcher)"},
    {"taken", T_PYSSIZET, offsetof(ImplOp, taken), READONLY,
     "how many calls ran the function itself"},
    {"fallback", T_OBJECT, offsetof(ImplOp, fallback), READONLY, "the overload's caller"},
    {"impl", T_OBJECT, offsetof(ImplOp, impl), READONLY, "the op's Python function"},
    {nullptr, 0, 0, 0, nullptr}};

PyTypeObject ImplOpType = {PyVarObject_HEAD_INIT(nullptr, 0) "flowkern._fastcall.ImplOp"};

// impl(qualified_name, overload_name, fallback, impl) -> an ImplOp, or
// `fallback` itself when a schema argument is of a kind plain_call does not
// check.
PyObject* make_impl(PyObject*, PyObject* args) {
  const char* name = nullptr;
  const char* overload = nullptr;
  PyObject* fallback = nullptr;
  PyObject* fn = nullptr;
  if (!PyArg_ParseTuple(args, "ssOO:impl", &name, &overload, &fallback, &fn)) return nullptr;
  HANDLE_TH_ERRORS
  const c10::OperatorHandle handle =
      c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
  auto kinds = std::make_unique<std::vector<Arg>>();
  if (!argument_kinds(handle.schema(), *kinds)) {
    Py_INCREF(fallback);
    return fallback;
  }
  auto writes = std::make_unique<std::vector<bool>>();
  for (const c10::Argument& a : handle.schema().arguments())
    writes->push_back(a.alias_info() != nullptr && a.alias_info()->isWrite());
  ImplOp* self = PyObject_New(ImplOp, &ImplOpType);
  if (self == nullptr) return nullptr;
  self->vectorcall = impl_call;
  self->kinds = kinds.release();
  self->writes = writes.release();
  Py_INCREF(fn);
  self->impl = fn;
  Py_INCREF(fallback);
  self->fallback = fallback;
  self->fallbacks = 0;
  self->taken = 0;
  self->name = op_name(name, overload);
  return reinterpret_cast<PyObject*>(self);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"op", make_op, METH_VARARGS,
     "op(qualified_name, overload_name, fallback): the fast caller of one overload"},
    {"impl", make_impl, METH_VARARGS,
     "impl(qualified_name, overload_name, fallback, impl): the direct caller of a custom "
     "op's Python function, for the calls its dispatcher wrappers would only pass on"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastcall", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__fastcall() {
  FastOpType.tp_basicsize = sizeof(FastOp);
  FastOpType.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL;
  FastOpType.tp_vectorcall_offset = offsetof(FastOp, vectorcall);
  FastOpType.tp_call = PyVectorcall_Call;
  FastOpType.tp_dealloc = fast_dealloc;
  FastOpType.tp_repr = fast_repr;
  FastOpType.tp_members = fast_members;
  FastOpType.tp_doc = "A flowkern:: overload's fast Python caller (csrc/fastcall/fastcall.cpp)";
  if (PyType_Ready(&FastOpType) < 0) return nullptr;
  ImplOpType.tp_basicsize = sizeof(ImplOp);
  ImplOpType.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL;
  ImplOpType.tp_vectorcall_offset = offsetof(ImplOp, vectorcall);
  ImplOpType.tp_call = PyVectorcall_Call;
  ImplOpType.tp_dealloc = impl_dealloc;
  ImplOpType.tp_repr = impl_repr;
  ImplOpType.tp_members = impl_members;
  ImplOpType.tp_doc = "A flowkern_triton:: op's direct Python caller (csrc/fastcall/fastcall.cpp)";
  if (PyType_Ready(&ImplOpType) < 0) return nullptr;
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  // the torch it is bound to: flowkern imports it only into that one
  if (PyModule_AddStringConstant(m, "TORCH_VERSION", FK_BUILD_TORCH_VERSION) < 0 ||
      fk_add_entries(m) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
