// flowkern._fastcall's entries: the usual call of each public function, in C
// (docs/build.md "Public calls in C").
//
// A public function's Python (flowkern/ops/steps.py, training.py) first
// hands all its arguments, positionally, to its entry here. The entry takes
// the call only when every argument is of the usual kind: plain tensors, a
// native backend for x's device with no use_backend()/FLOWKERN_BACKEND
// override, prediction and schedule given by name, float or tensor times or a
// step table, given output buffers (or small fresh ones), nothing that needs a
// gradient. It then pushes the op's arguments, calls the flowkern:: overload
// the Python would call (Dispatcher::callBoxed: profiler, the Autograd-key
// kernel, every backend key) and returns what the Python returns. For any
// other call it returns None and the Python runs as before, so every rule,
// conversion and error message stays in one place: the Python and the C++
// op. What an entry accepts is a subset of what its Python passes straight
// to the same op with the same arguments; an error from the op itself is
// raised as torch's binding raises it, and the Python retypes it as it does
// its own op calls (flowkern/ops/_registry.py retyped).
//
// The names and codes (prediction, target, form and reduction codes, the
// built-in schedules' kinds and parameters, which backends are native) come
// from the Python rule book once, through configure().
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <cmath>
#include <stdexcept>
#include <vector>

#include "call.h"
#include "entries.h"

namespace {

using c10::IValue;
using Stack = torch::jit::Stack;

struct Spec {
  int64_t kind;
  c10::List<double> params;
};

// What configure() set; null/empty until then (every entry misses).
struct Config {
  bool ready = false;
  PyObject* backend_var = nullptr;     // flowkern.backend._current (use_backend)
  PyObject* prechecked_var = nullptr;  // flowkern._validate._PRECHECKED (check_flag)
  PyObject* env_data = nullptr;        // os.environ's byte dict, or None
  PyObject* env_key = nullptr;         // its FLOWKERN_BACKEND key
  PyObject* fwad_dict = nullptr;       // torch.autograd.forward_ad's globals
  PyObject* level_key = nullptr;       // "_current_level"
  PyObject* pred_codes = nullptr;      // PRED_CODE: prediction and target names
  PyObject* form_codes = nullptr;      // FORMS
  PyObject* reduction_codes = nullptr; // REDUCTION_CODE
  PyObject* schedule_index = nullptr;  // built-in name -> index into specs
  std::vector<Spec> specs;
  bool auto_cpu_native = false;   // backend=None runs a CPU tensor on flowkern::
  bool auto_cuda_native = false;  // ... and a CUDA tensor
  bool cuda_native = false;       // backend="cuda" runs on flowkern:: (the CUDA glue built)
  int64_t huge_bytes = 0;         // empty_output's huge-page threshold
  int64_t table_kind = 0;         // TABLE_KIND: the kind of a caller's coefficient table
  std::vector<c10::OperatorHandle> ops;
  std::vector<Py_ssize_t> taken;  // calls each op took here (tests: the public calls' path)
};
Config cfg;

enum Op {
  kInterpolate, kInterpolateOut, kConvert, kFmLoss, kEuler, kHeun, kEiNograd, kEiOut, kDpmpp,
  kEm, kChurn, kLms, kLincomb, kFlowmapLoss,
  // the steps' `.times` overloads (per-sample time tensors: schemas.inc)
  kEulerTimes, kHeunTimes, kEiNogradTimes, kEiOutTimes, kDpmppTimes, kEmTimes, kChurnTimes,
  kLmsTimes, kNumOps
};
const char* const kOpNames[kNumOps][2] = {
    {"flowkern::interpolate", "nograd"}, {"flowkern::interpolate_out", ""},
    {"flowkern::convert", "nograd"},     {"flowkern::fm_loss", "nograd"},
    {"flowkern::euler_step", ""},        {"flowkern::heun_step", ""},
    {"flowkern::ei_step", "nograd"},     {"flowkern::ei_step_out", ""},
    {"flowkern::dpmpp_2m_step", ""},     {"flowkern::em_step", ""},
    {"flowkern::churn", ""},             {"flowkern::lms_step", ""},
    {"flowkern::lincomb_step", ""},      {"flowkern::flowmap_loss", "nograd"},
    {"flowkern::euler_step", "times"},   {"flowkern::heun_step", "times"},
    {"flowkern::ei_step", "times_nograd"}, {"flowkern::ei_step_out", "times"},
    {"flowkern::dpmpp_2m_step", "times"}, {"flowkern::em_step", "times"},
    {"flowkern::churn", "times"},        {"flowkern::lms_step", "times"}};

// A step op's `.times` overload.
Op timed_of(Op op) {
  switch (op) {
    case kEuler: return kEulerTimes;
    case kHeun: return kHeunTimes;
    case kEiNograd: return kEiNogradTimes;
    case kEiOut: return kEiOutTimes;
    case kDpmpp: return kDpmppTimes;
    case kEm: return kEmTimes;
    case kChurn: return kChurnTimes;
    case kLms: return kLmsTimes;
    default: return op;
  }
}

const c10::List<double>& no_floats() {
  static const c10::List<double> empty;
  return empty;
}

inline bool plain(PyObject* o) { return THPVariable_CheckExact(o); }

// An exact float, or an exact int (a bool is not one) that converts as
// float() does; false leaves the value to the Python.
bool number(PyObject* o, double& v) {
  if (PyFloat_CheckExact(o)) { v = PyFloat_AS_DOUBLE(o); return true; }
  if (!PyLong_CheckExact(o)) return false;
  v = PyLong_AsDouble(o);
  if (v == -1.0 && PyErr_Occurred()) { PyErr_Clear(); return false; }
  return true;
}

// A seed or offset the rule book accepts: an exact int in [0, 2^63).
bool seed_of(PyObject* o, int64_t& v) { return fk_fastcall::int64_of(o, v) && v >= 0; }

// The code of an exact str in one of the rule book's dicts.
bool code_of(PyObject* codes, PyObject* o, int64_t& c) {
  if (!PyUnicode_CheckExact(o)) return false;
  PyObject* v = PyDict_GetItemWithError(codes, o);  // borrowed
  if (v == nullptr) { PyErr_Clear(); return false; }
  c = PyLong_AsLongLong(v);
  return true;
}

const Spec* spec_of(PyObject* schedule) {
  if (!PyUnicode_CheckExact(schedule)) return nullptr;
  PyObject* i = PyDict_GetItemWithError(cfg.schedule_index, schedule);
  if (i == nullptr) { PyErr_Clear(); return nullptr; }
  return &cfg.specs[PyLong_AsSsize_t(i)];
}

// A ContextVar's value (a new reference), or null.
PyObject* var_value(PyObject* var) {
  PyObject* v = nullptr;
  if (PyContextVar_Get(var, nullptr, &v) < 0) { PyErr_Clear(); return nullptr; }
  return v;
}

// flowkern.backend.resolve_for(backend, x) is a native backend, decided
// without any override in force (use_backend, FLOWKERN_BACKEND): those calls
// go to the Python.
bool native_backend(PyObject* backend, const at::Tensor& x) {
  if (backend == Py_None) {
    PyObject* cur = var_value(cfg.backend_var);
    const bool unset = cur == Py_None;
    Py_XDECREF(cur);
    if (!unset) return false;
    if (cfg.env_data == Py_None) return false;  // no byte dict to read: the Python reads it
    if (PyDict_GetItemWithError(cfg.env_data, cfg.env_key) != nullptr) return false;
    if (PyErr_Occurred()) { PyErr_Clear(); return false; }
    return x.is_cpu() ? cfg.auto_cpu_native : x.is_cuda() && cfg.auto_cuda_native;
  }
  if (!PyUnicode_CheckExact(backend)) return false;
  if (PyUnicode_CompareWithASCIIString(backend, "cpu") == 0) return x.is_cpu();
  if (PyUnicode_CompareWithASCIIString(backend, "cuda") == 0)
    return x.is_cuda() && cfg.cuda_native;
  return false;
}

// _validate.check_flag() outside torch.compile: values are checked unless a
// prechecked() block says they were.
bool check_flag() {
  PyObject* v = var_value(cfg.prechecked_var);
  const bool checked = v == nullptr || PyObject_IsTrue(v) != 1;
  Py_XDECREF(v);
  return checked;
}

// What the thread's dispatch state adds to a plain call: a functorch
// transform, a TorchDispatchMode or anything else among the included keys,
// or a TorchFunctionMode. Such calls go to the Python.
bool plain_state() {
  return !at::impl::torch_function_mode_enabled() &&
         (c10::impl::tls_local_dispatch_key_set().included_ - c10::default_included_set).empty();
}

// A forward-mode dual level is open (torch.autograd.forward_ad).
bool dual_level_open() {
  PyObject* level = PyDict_GetItemWithError(cfg.fwad_dict, cfg.level_key);
  if (level == nullptr) { PyErr_Clear(); return true; }
  return PyLong_AsLong(level) >= 0;
}

// _need_grad2/3 (training.py) for tensors that may need a gradient.
bool needs_grad(std::initializer_list<const at::Tensor*> ts) {
  if (dual_level_open()) return true;
  if (!c10::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : ts)
    if (t != nullptr && t->defined() && t->requires_grad()) return true;
  return false;
}

struct Call {
  Stack st;
  bool timed = false;  // a step's times include a tensor: its `.times` overload
  Call() { st.reserve(16); }
  const at::Tensor& top() const { return st.back().toTensor(); }
  bool tensor(PyObject* o) {
    if (!plain(o)) return false;
    st.emplace_back(THPVariable_Unpack(o));
    return true;
  }
  bool opt_tensor(PyObject* o) {
    if (o == Py_None) { st.emplace_back(); return true; }
    return tensor(o);
  }
  bool code(PyObject* codes, PyObject* o) {
    int64_t c = 0;
    if (!code_of(codes, o, c)) return false;
    st.emplace_back(c);
    return true;
  }
  bool floats(PyObject* o) {  // _floats: a list or tuple of numbers
    if (!PyList_CheckExact(o) && !PyTuple_CheckExact(o)) return false;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
    PyObject** items = PySequence_Fast_ITEMS(o);
    c10::List<double> list;
    list.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      double v = 0;
      if (!number(items[i], v)) return false;
      list.push_back(v);
    }
    st.emplace_back(std::move(list));
    return true;
  }
  bool seed(PyObject* o, bool optional) {  // _seed_offset's seed (None: 0) and offset
    int64_t v = 0;
    if (!(optional && o == Py_None) && !seed_of(o, v)) return false;
    st.emplace_back(v);
    return true;
  }
  // _guidance: 1 without CFG; the weight with pred_uncond.
  bool guidance(PyObject* pred_uncond, PyObject* w) {
    double v = 1.0;
    if (pred_uncond == Py_None ? w != Py_None : !number(w, v)) return false;
    st.emplace_back(v);
    return true;
  }
  // steps.py _native_coef: (table, times, kind, params): the caller's table,
  // or the times, each a number, with g a number, and a built-in schedule by
  // name (t_prev, g: may be null or None); with a time given as a plain
  // tensor, (table, t, s, t_prev, times, kind, params) of the op's `.times`
  // overload (0 in `times` for each tensor), which run() then calls.
  bool step_coef(PyObject* t, PyObject* s, PyObject* schedule, PyObject* table,
                 PyObject* t_prev = nullptr, PyObject* g = nullptr) {
    if (table != Py_None) {
      if (!tensor(table)) return false;
      st.emplace_back(no_floats());
      st.emplace_back(cfg.table_kind);
      st.emplace_back(no_floats());
      return true;
    }
    const Spec* spec = spec_of(schedule);
    if (spec == nullptr) return false;
    double gv = 0;
    if (g != nullptr && g != Py_None && !number(g, gv)) return false;
    st.emplace_back();  // no table
    PyObject* given[3] = {t, s, t_prev == nullptr ? Py_None : t_prev};
    double v[3] = {0, 0, std::nan("")};
    for (int i = 0; i < 3; ++i) {
      PyObject* o = given[i];
      if (i == 2 && o == Py_None) continue;
      if (plain(o)) {
        timed = true;
      } else if (!number(o, v[i])) {
        return false;
      }
    }
    if (timed)
      for (int i = 0; i < 3; ++i) {
        if (plain(given[i])) st.emplace_back(THPVariable_Unpack(given[i]));
        else st.emplace_back();
      }
    st.emplace_back(c10::List<double>({v[0], v[1], v[2], gv}));
    st.emplace_back(spec->kind);
    st.emplace_back(spec->params);
    return true;
  }
  bool time(PyObject* t) {
    double tv = 0;
    if (plain(t)) {
      st.emplace_back(THPVariable_Unpack(t));
    } else if (number(t, tv)) {
      st.emplace_back();
    } else {
      return false;
    }
    st.emplace_back(tv);
    return true;
  }
  // training.py _native_coef: (t, t_value, kind, params) for a built-in schedule.
  bool time_coef(PyObject* t, PyObject* schedule) {
    const Spec* spec = spec_of(schedule);
    if (spec == nullptr || !time(t)) return false;
    st.emplace_back(spec->kind);
    st.emplace_back(spec->params);
    return true;
  }
  // flowmap.py _native_coef: (t, t_value, s, s_value, kind, params): the
  // caller's table (in t), or the two times and a built-in schedule by name.
  bool map_coef(PyObject* t, PyObject* s, PyObject* schedule, PyObject* table) {
    if (table != Py_None) {
      if (!tensor(table)) return false;
      st.emplace_back(0.0);
      st.emplace_back();
      st.emplace_back(0.0);
      st.emplace_back(cfg.table_kind);
      st.emplace_back(no_floats());
      return true;
    }
    const Spec* spec = spec_of(schedule);
    if (spec == nullptr || !time(t) || !time(s)) return false;
    st.emplace_back(spec->kind);
    st.emplace_back(spec->params);
    return true;
  }
  // A step's output buffer: the caller's, or a fresh one as empty_output
  // makes it below its huge-page size (returned new in `fresh`).
  bool out(PyObject* o, const at::Tensor& like, PyObject*& fresh) {
    if (o != Py_None) return tensor(o);
    if (like.numel() * static_cast<int64_t>(like.element_size()) >= cfg.huge_bytes &&
        like.is_cpu())
      return false;
    at::Tensor t = at::empty_like(like, {}, at::MemoryFormat::Contiguous);
    fresh = THPVariable_Wrap(t);
    if (fresh == nullptr) return false;
    st.emplace_back(std::move(t));
    return true;
  }
  bool flag() {
    st.emplace_back(check_flag());
    return true;
  }
  // The op (call.h: the GIL released, the tensors kept); false with the
  // Python error set.
  bool run(Op op) {
    if (timed) op = timed_of(op);
    if (!fk_fastcall::call_boxed(cfg.ops[op], st)) return false;
    ++cfg.taken[op];
    return true;
  }
};

PyObject* miss() { Py_RETURN_NONE; }

PyObject* new_ref(PyObject* o) {
  Py_INCREF(o);
  return o;
}

// A step's returned buffer: the caller's, or the fresh one.
PyObject* buffer(PyObject* given, PyObject* fresh) {
  return fresh != nullptr ? fresh : new_ref(given);
}

// The tuple (a, b) of two new references, which it takes (null if either is).
PyObject* pair(PyObject* a, PyObject* b) {
  PyObject* r = a != nullptr && b != nullptr ? PyTuple_Pack(2, a, b) : nullptr;
  Py_XDECREF(a);
  Py_XDECREF(b);
  return r;
}

// Fresh outputs that a missed call leaves behind are dropped.
struct Fresh {
  PyObject* p[2] = {nullptr, nullptr};
  ~Fresh() { Py_XDECREF(p[0]); Py_XDECREF(p[1]); }
  PyObject* take(int i) { PyObject* o = p[i]; p[i] = nullptr; return o; }
};

#define FK_ARGS(n)                                             \
  if (!cfg.ready || nargs != (n) || !plain_state()) return miss(); \
  HANDLE_TH_ERRORS

#define FK_END END_HANDLE_TH_ERRORS

// euler_step(x, pred, t, s, schedule, prediction, pred_uncond, guidance, out, table, backend)
PyObject* euler_step(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  FK_ARGS(11)
  Call c;
  Fresh f;
  if (!c.tensor(a[0]) || !native_backend(a[10], c.top())) return miss();
  const at::Tensor x = c.top();
  if (!(c.tensor(a[1]) && c.opt_tensor(a[6]) && c.step_coef(a[2], a[3], a[4], a[9]) &&
        c.code(cfg.pred_codes, a[5]) && c.guidance(a[6], a[7]) && c.flag() &&
        c.out(a[8], x, f.p[0])))
    return miss();
  if (!c.run(kEuler)) return nullptr;
  return buffer(a[8], f.take(0));
  FK_END
}

// heun_step(x, pred, x_euler, pred_euler, t, s, schedule, prediction, pred_uncond,
//           pred_euler_uncond, guidance, out, table, backend)
PyObject* heun_step(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  FK_ARGS(14)
  Call c;
  Fresh f;
  if ((a[8] == Py_None) != (a[9] == Py_None)) return miss();
  if (!c.tensor(a[0]) || !native_backend(a[13], c.top())) return miss();
  const at::Tensor x = c.top();
  if (!(c.tensor(a[1]) && c.tensor(a[2]) && c.tensor(a[3]) && c.opt_tensor(a[8]) &&
        c.opt_tensor(a[9]) && c.step_coef(a[4], a[5], a[6], a[12]) &&
        c.code(cfg.pred_codes, a[7]) && c.guidance(a[8], a[10]) && c.flag() &&
        c.out(a[11], x, f.p[0])))
    return miss();
  if (!c.run(kHeun)) return nullptr;
  return buffer(a[11], f.take(0));
  FK_END
}

// ei_step(x, pred, t, s, schedule, prediction, form, pred_uncond, guidance, out, table, backend)
PyObject* ei_step(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  FK_ARGS(12)
  Call c;
  if (!c.tensor(a[0]) || !native_backend(a[11], c.top())) return miss();
  const at::Tensor x = c.top();
  if (!(c.tensor(a[1]) && c.opt_tensor(a[7]))) return miss();
  const bool out = a[9] != Py_None;
  if (!out) {  // the differentiable step unless nothing needs a gradient
    const at::Tensor& pu = c.st[2].isTensor() ? c.st[2].toTensor() : x;
    if (needs_grad({&x, &c.st[1].toTensor(), &pu})) return miss();
  }
  if (!(c.step_coef(a[2], a[3], a[4], a[10]) && c.code(cfg.pred_codes, a[5]) &&
        c.code(cfg.form_codes, a[6]) && c.guidance(a[7], a[8]) && c.flag()))
    return miss();
  if (!out) {
    if (!c.run(kEiNograd)) return nullptr;
    return THPVariable_Wrap(std::move(c.st[0]).toTensor());
  }
  if (!c.tensor(a[9])) return miss();
  if (!c.run(kEiOut)) return nullptr;
  return new_ref(a[9]);
  FK_END
}

// dpmpp_2m_step(x, pred, t, s, schedule, prediction, d_prev, t_prev, pred_uncond, guidance,
//               out, d_out, table, backend)
PyObject* dpmpp_2m_step(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  FK_ARGS(14)
  Call c;
  Fresh f;
  if ((a[6] == Py_None) != (a[7] == Py_None) && a[12] == Py_None) return miss();
  if (!c.tensor(a[0]) || !native_backend(a[13], c.top())) return miss();
  const at::Tensor x = c.top();
  if (!(c.tensor(a[1]) && c.opt_tensor(a[6]) && c.opt_tensor(a[8]) &&
        c.step_coef(a[2], a[3], a[4], a[12], a[7]) && c.code(cfg.pred_codes, a[5]) &&
        c.guidance(a[8], a[9]) && c.flag() && c.out(a[10], x, f.p[0]) &&
        c.out(a[11], x, f.p[1])))
    return miss();
  if (!c.run(kDpmpp)) return nullptr;
  return pair(buffer(a[10], f.take(0)), buffer(a[11], f.take(1)));
  FK_END
}

// em_step(x, pred, t, s, schedule, prediction, g, seed, offset, pred_uncond, guidance, out,
//         table, backend, per_sample_seeds)
PyObject* em_step(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  FK_ARGS(15)
  Call c;
  Fresh f;
  if (a[7] != Py_None && a[14] != Py_None) return miss();
  if (!c.tensor(a[0]) || !native_backend(a[13], c.top())) return miss();
  const at::Tensor x = c.top();
  if (!(c.tensor(a[1]) && c.opt_tensor(a[9]) &&
        c.step_coef(a[2], a[3], a[4], a[12], nullptr, a[6]) && c.code(cfg.pred_codes, a[5]) &&
        c.guidance(a[9], a[10]) && c.seed(a[7], true) && c.seed(a[8], false) &&
        c.opt_tensor(a[14]) && c.flag() && c.out(a[11], x, f.p[0])))
    return miss();
  if (!c.run(kEm)) return nullptr;
  return buffer(a[11], f.take(0));
  FK_END
}

// churn(x, t, t_hat, schedule, seed, offset, out, table, backend, per_sample_seeds)
PyObject* churn(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  FK_ARGS(10)
  Call c;
  Fresh f;
  if (a[4] != Py_None && a[9] != Py_None) return miss();
  if (!c.tensor(a[0]) || !native_backend(a[8], c.top())) return miss();
  const at::Tensor x = c.top();
  if (!(c.step_coef(a[1], a[2], a[3], a[7]) && c.seed(a[4], true) && c.seed(a[5], false) &&
        c.opt_tensor(a[9]) && c.flag() && c.out(a[6], x, f.p[0])))
    return miss();
  if (!c.run(kChurn)) return nullptr;
  return buffer(a[6], f.take(0));
  FK_END
}

// lms_step(x, pred, weights, history, t, schedule, prediction, pred_uncond, guidance, out,
//          u_out, table, backend)
PyObject* lms_step(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  FK_ARGS(13)
  Call c;
  Fresh f;
  PyObject* hist = a[3];
  if (!PyList_CheckExact(hist) && !PyTuple_CheckExact(hist)) return miss();
  const Py_ssize_t nh = PySequence_Fast_GET_SIZE(hist);
  if (nh > 3) return miss();
  if (!c.tensor(a[0]) || !native_backend(a[12], c.top())) return miss();
  const at::Tensor x = c.top();
  if (!c.tensor(a[1])) return miss();
  for (Py_ssize_t j = 0; j < 3; ++j)  // _lms_history: the given ones, then None
    if (!(j < nh ? c.tensor(PySequence_Fast_GET_ITEM(hist, j)) : c.opt_tensor(Py_None)))
      return miss();
  if (!(c.opt_tensor(a[7]) && c.floats(a[2]) && c.step_coef(a[4], a[4], a[5], a[11]) &&
        c.code(cfg.pred_codes, a[6]) && c.guidance(a[7], a[8]) && c.flag() &&
        c.out(a[9], x, f.p[0]) && c.out(a[10], x, f.p[1])))
    return miss();
  if (!c.run(kLms)) return nullptr;
  return pair(buffer(a[9], f.take(0)), buffer(a[10], f.take(1)));
  FK_END
}

// lincomb_step(x, terms, weights, noise_std, seed, offset, per_sample_seeds, out, backend)
PyObject* lincomb_step(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  FK_ARGS(9)
  Call c;
  Fresh f;
  if (a[4] != Py_None && a[6] != Py_None) return miss();
  PyObject* terms = a[1];
  if (!PyList_CheckExact(terms) && !PyTuple_CheckExact(terms)) return miss();
  if (!c.tensor(a[0]) || !native_backend(a[8], c.top())) return miss();
  const at::Tensor x = c.top();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(terms);
  c10::List<at::Tensor> list;
  list.reserve(n);
  for (Py_ssize_t k = 0; k < n; ++k) {
    PyObject* p = PySequence_Fast_GET_ITEM(terms, k);
    if (!plain(p)) return miss();
    list.push_back(THPVariable_Unpack(p));
  }
  c.st.emplace_back(std::move(list));
  double std_ = 0;
  if (!(c.floats(a[2]) && number(a[3], std_))) return miss();
  c.st.emplace_back(std_);
  if (!(c.seed(a[4], true) && c.seed(a[5], false) && c.opt_tensor(a[6]) && c.flag() &&
        c.out(a[7], x, f.p[0])))
    return miss();
  if (!c.run(kLincomb)) return nullptr;
  return buffer(a[7], f.take(0));
  FK_END
}

// interpolate(x0, x1, t, schedule, target, out, backend)
PyObject* interpolate(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  FK_ARGS(7)
  Call c;
  if (!plain(a[1]) || !native_backend(a[6], THPVariable_Unpack(a[1]))) return miss();
  if (!(c.tensor(a[0]) && c.tensor(a[1]) && c.time_coef(a[2], a[3]) &&
        c.code(cfg.pred_codes, a[4]) && c.flag()))
    return miss();
  PyObject* out = a[5];
  if (out == Py_None) {
    if (needs_grad({&c.st[0].toTensor(), &c.st[1].toTensor()})) return miss();
    if (!c.run(kInterpolate)) return nullptr;
    return pair(THPVariable_Wrap(std::move(c.st[0]).toTensor()),
                THPVariable_Wrap(std::move(c.st[1]).toTensor()));
  }
  // _check_out: a pair of tensors, neither needing a gradient
  if (!(PyTuple_CheckExact(out) || PyList_CheckExact(out)) || PySequence_Fast_GET_SIZE(out) != 2)
    return miss();
  PyObject* o0 = PySequence_Fast_GET_ITEM(out, 0);
  PyObject* o1 = PySequence_Fast_GET_ITEM(out, 1);
  if (!c.tensor(o0) || !c.tensor(o1)) return miss();
  if (c10::GradMode::is_enabled() &&
      (c.st[c.st.size() - 2].toTensor().requires_grad() || c.top().requires_grad()))
    return miss();
  if (!c.run(kInterpolateOut)) return nullptr;
  return PyTuple_CheckExact(out) ? new_ref(out) : PyTuple_Pack(2, o0, o1);
  FK_END
}

// flow_matching_loss(pred, x0, x1, t, schedule, target, weight, reduction, backend)
PyObject* flow_matching_loss(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  FK_ARGS(9)
  Call c;
  if (!plain(a[0]) || !native_backend(a[8], THPVariable_Unpack(a[0]))) return miss();
  if (!(c.tensor(a[0]) && c.tensor(a[1]) && c.tensor(a[2]) && c.time_coef(a[3], a[4]) &&
        c.code(cfg.pred_codes, a[5]) && c.opt_tensor(a[6]) &&
        c.code(cfg.reduction_codes, a[7]) && c.flag()))
    return miss();
  const IValue& w = c.st[c.st.size() - 3];
  if (needs_grad({&c.st[0].toTensor(), &c.st[1].toTensor(), &c.st[2].toTensor(),
                  w.isTensor() ? &w.toTensor() : nullptr}))
    return miss();
  if (!c.run(kFmLoss)) return nullptr;
  return THPVariable_Wrap(std::move(c.st[0]).toTensor());
  FK_END
}

// flowmap_loss(x, pred, target, t, s, schedule, prediction, form, weight, reduction, table,
//              backend)
PyObject* flowmap_loss(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  FK_ARGS(12)
  Call c;
  if (!plain(a[0]) || !native_backend(a[11], THPVariable_Unpack(a[0]))) return miss();
  if (!(c.tensor(a[0]) && c.tensor(a[1]) && c.tensor(a[2]) && c.map_coef(a[3], a[4], a[5], a[10]) &&
        c.code(cfg.pred_codes, a[6]) && c.code(cfg.form_codes, a[7]) && c.opt_tensor(a[8]) &&
        c.code(cfg.reduction_codes, a[9]) && c.flag()))
    return miss();
  const IValue& w = c.st[c.st.size() - 3];
  const IValue& t = c.st[3];
  const IValue& s = c.st[5];
  // the times too: the Python refuses one that requires grad (flowmap.py _no_time_grad)
  if (needs_grad({&c.st[0].toTensor(), &c.st[1].toTensor(), &c.st[2].toTensor(),
                  w.isTensor() ? &w.toTensor() : nullptr, t.isTensor() ? &t.toTensor() : nullptr,
                  s.isTensor() ? &s.toTensor() : nullptr}))
    return miss();
  if (!c.run(kFlowmapLoss)) return nullptr;
  return THPVariable_Wrap(std::move(c.st[0]).toTensor());
  FK_END
}

// convert(pred, x_t, t, schedule, src, dst, backend)
PyObject* convert(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  FK_ARGS(7)
  Call c;
  if (!plain(a[1]) || !native_backend(a[6], THPVariable_Unpack(a[1]))) return miss();
  if (!(c.tensor(a[0]) && c.tensor(a[1]) && c.time_coef(a[2], a[3]) &&
        c.code(cfg.pred_codes, a[4]) && c.code(cfg.pred_codes, a[5]) && c.flag()))
    return miss();
  if (needs_grad({&c.st[0].toTensor(), &c.st[1].toTensor()})) return miss();
  if (!c.run(kConvert)) return nullptr;
  return THPVariable_Wrap(std::move(c.st[0]).toTensor());
  FK_END
}

// configure(dict): the rule book's names and codes, and the context the
// entries read (flowkern/ops/_entries.py).
PyObject* configure(PyObject*, PyObject* d) {
  if (!PyDict_Check(d)) {
    PyErr_SetString(PyExc_TypeError, "configure: expected a dict");
    return nullptr;
  }
  auto item = [&](const char* k) -> PyObject* {
    PyObject* v = PyDict_GetItemString(d, k);
    if (v == nullptr) PyErr_Format(PyExc_KeyError, "configure: missing %s", k);
    return v;
  };
  HANDLE_TH_ERRORS
  const char* objs[] = {"backend_var", "prechecked_var", "env_data", "env_key", "fwad_dict",
                        "pred_codes", "form_codes", "reduction_codes", "schedules",
                        "auto_cpu_native", "auto_cuda_native", "cuda_native", "huge_bytes",
                        "table_kind"};
  for (const char* k : objs)
    if (item(k) == nullptr) return nullptr;
  cfg.ready = false;
  cfg.backend_var = new_ref(item("backend_var"));
  cfg.prechecked_var = new_ref(item("prechecked_var"));
  cfg.env_data = new_ref(item("env_data"));
  cfg.env_key = new_ref(item("env_key"));
  cfg.fwad_dict = new_ref(item("fwad_dict"));
  cfg.level_key = PyUnicode_InternFromString("_current_level");
  cfg.pred_codes = new_ref(item("pred_codes"));
  cfg.form_codes = new_ref(item("form_codes"));
  cfg.reduction_codes = new_ref(item("reduction_codes"));
  cfg.auto_cpu_native = PyObject_IsTrue(item("auto_cpu_native")) == 1;
  cfg.auto_cuda_native = PyObject_IsTrue(item("auto_cuda_native")) == 1;
  cfg.cuda_native = PyObject_IsTrue(item("cuda_native")) == 1;
  cfg.huge_bytes = PyLong_AsLongLong(item("huge_bytes"));
  cfg.table_kind = PyLong_AsLongLong(item("table_kind"));
  // schedules: {name: (kind, params)}
  PyObject* scheds = item("schedules");
  cfg.schedule_index = PyDict_New();
  cfg.specs.clear();
  PyObject *name = nullptr, *spec = nullptr;
  Py_ssize_t pos = 0;
  while (PyDict_Next(scheds, &pos, &name, &spec)) {
    PyObject* kind = PyTuple_GetItem(spec, 0);
    PyObject* params = PySequence_Fast(PyTuple_GetItem(spec, 1), "schedule params");
    if (kind == nullptr || params == nullptr) return nullptr;
    Spec s{PyLong_AsLongLong(kind), c10::List<double>()};
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(params); ++i)
      s.params.push_back(PyFloat_AsDouble(PySequence_Fast_GET_ITEM(params, i)));
    Py_DECREF(params);
    if (PyErr_Occurred()) return nullptr;
    PyObject* index = PyLong_FromSize_t(cfg.specs.size());
    cfg.specs.push_back(std::move(s));
    if (PyDict_SetItem(cfg.schedule_index, name, index) < 0) return nullptr;
    Py_DECREF(index);
  }
  cfg.ops.clear();
  for (const auto& [op, overload] : kOpNames)
    cfg.ops.push_back(c10::Dispatcher::singleton().findSchemaOrThrow(op, overload));
  cfg.taken.assign(kNumOps, 0);
  cfg.ready = true;
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// taken(): {"flowkern::op.overload": calls the entries made of it}
PyObject* taken(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
  for (size_t i = 0; i < cfg.taken.size(); ++i) {
    PyObject* name = *kOpNames[i][1] ? PyUnicode_FromFormat("%s.%s", kOpNames[i][0], kOpNames[i][1])
                                     : PyUnicode_FromString(kOpNames[i][0]);
    PyObject* n = PyLong_FromSsize_t(cfg.taken[i]);
    const int rc = name && n ? PyDict_SetItem(d, name, n) : -1;
    Py_XDECREF(name);
    Py_XDECREF(n);
    if (rc < 0) { Py_DECREF(d); return nullptr; }
  }
  return d;
}

#define FK_ENTRY(name, doc) \
  {#name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(name)), METH_FASTCALL, doc}

PyMethodDef entry_methods[] = {
    {"configure", configure, METH_O,
     "configure(dict): the rule book's codes and the context the entries read"},
    {"taken", taken, METH_NOARGS, "taken(): how many calls of each op the entries made"},
    FK_ENTRY(interpolate, "interpolate's usual call, or None"),
    FK_ENTRY(flow_matching_loss, "flow_matching_loss's usual call, or None"),
    FK_ENTRY(convert, "convert's usual call, or None"),
    FK_ENTRY(flowmap_loss, "flowmap_loss's usual call, or None"),
    FK_ENTRY(euler_step, "euler_step's usual call, or None"),
    FK_ENTRY(heun_step, "heun_step's usual call, or None"),
    FK_ENTRY(ei_step, "ei_step's usual call, or None"),
    FK_ENTRY(dpmpp_2m_step, "dpmpp_2m_step's usual call, or None"),
    FK_ENTRY(em_step, "em_step's usual call, or None"),
    FK_ENTRY(churn, "churn's usual call, or None"),
    FK_ENTRY(lms_step, "lms_step's usual call, or None"),
    FK_ENTRY(lincomb_step, "lincomb_step's usual call, or None"),
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

int fk_add_entries(PyObject* module) { return PyModule_AddFunctions(module, entry_methods); }
