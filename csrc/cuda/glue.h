// The CUDA-key kernels of the flowkern:: ops (docs/design.md §8): tensors in,
// one launcher call (launchers.h) out. Each op checks its arguments with the
// CPU ops' own rules and messages (csrc/cpu/args.h, coef_checks.h,
// step_args.h, flowmap_args.h, field_args.h), allocates its outputs, makes
// the tensors' device current (D::Guard) and launches on torch's current
// stream of that device; nothing synchronises with the host.
//
// Coefficients (flowkern/coef_arg.h): a time the host knows (t_value, a
// step's times) is evaluated here in double and passed by value, and its
// value checks run here, always, as on the CPU; per-sample times on the
// device are evaluated in the kernel, and their values are checked only with
// FLOWKERN_DEBUG=1 (a copy to the host, the rule of flowkern/_validate.py);
// a custom schedule's table or a caller's step table is read where it lies.
// No coefficient table is built and nothing else is launched: a loss is its
// row-sum kernel and one finishing block.
//
// Templated over the device policy D (guard, stream, grid cap, value-check
// rule) and the launcher set L: register_cuda.cpp instantiates it on the GPU
// launchers for the CUDA key, csrc/cpu/cuda_sim_glue.cpp on the grid
// simulator's for CPU tensors, which is how tests/test_cuda_glue.py runs
// this very code without a GPU.
#pragma once

#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "../cpu/args.h"
#include "../cpu/coef_args.h"
#include "../cpu/coef_checks.h"
#include "../cpu/dispatch.h"
#include "../cpu/field_args.h"
#include "../cpu/flowmap_args.h"
#include "../cpu/step_ops.h"
#include "flowkern/coef_arg.h"
#include "flowkern/fields_block.h"
#include "launchers.h"

namespace flowkern_glue {

using namespace flowkern_cpu;
using fk::i64;

// Values on the device are checked only with FLOWKERN_DEBUG=1
// (flowkern/_validate.py values_checked): the check is a device -> host copy.
inline bool debug_checks() {
  const char* v = std::getenv("FLOWKERN_DEBUG");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

inline int dtype_code(const Tensor& x) {
  switch (x.scalar_type()) {
    case kFloat: return 0;
    case kDouble: return 1;
    case kHalf: return 2;
    case kBFloat16: return 3;
    default: FK_CHECK_TYPE(false, "dtype ", py_dtype(x.scalar_type()), " is not supported");
  }
}

inline uintptr_t ptr(const Tensor& t) {
  return t.defined() ? reinterpret_cast<uintptr_t>(t.const_data_ptr()) : 0;
}
inline uintptr_t ptr(const OptT& t) { return t ? ptr(*t) : 0; }

// Calls f(A{}) with A the accumulation type of x's dtype (docs/design.md §6).
template <class F> decltype(auto) with_acc(const Tensor& x, F&& f) {
  if (x.scalar_type() == kDouble) return f(double{});
  return f(float{});
}

template <class D, class L> struct Glue {
  static void ok(int code, const char* op) {
    FK_CHECK(code == 0, op, ": the CUDA launch failed with error ", code, " (",
             L::error_string(code), ")");
  }

  // One launch's device, stream and grid cap.
  struct Launch {
    typename D::Guard guard;
    uintptr_t stream;
    i64 max_blocks;
    explicit Launch(const Tensor& x)
        : guard(x.device()), stream(D::stream(x.device())), max_blocks(D::max_blocks(x.device())) {}
  };

  // ------------------------------------------------------------ training

  // A checked times tensor as a kernel reads it (fk::TimeSrc, SchedSrc): as
  // given in float32 or float64 (as the CPU op reads any dtype exactly),
  // 16-bit ones widened to float32, exactly; a time broadcast to the batch
  // (stride 0, as expand() makes it) as its one value, with no copy. `keep`
  // holds what the kernel reads, alive for the launch.
  static fk::TimeArg time_arg(const Tensor& t, OptT& keep) {
    Tensor v = t.dim() == 1 ? t : torch::stable::reshape(t, {-1});
    if (v.scalar_type() != kDouble && v.scalar_type() != kFloat) v = to_dtype(v, kFloat);
    const bool one = v.numel() > 1 && v.stride(0) == 0;
    keep = one ? v : contig(v);
    return {ptr(*keep), one ? 1 : keep->numel(), keep->scalar_type() == kDouble};
  }

  // The coefficients of a training op (coef_args.h's arguments); `keep`
  // holds a converted times tensor alive for the launch. checks(HostCoef)
  // runs the op's value checks where the values are on the host.
  template <class A, class Checks>
  static fk::CoefArg train_coef(FK_COEF_ARGS, i64 rows, const Tensor& like, bool check,
                                OptT& keep, Checks&& checks, const char* name = "t") {
    check_schedule(kind, params);
    fk::CoefArg c;
    if (kind == kTableKind) {
      const auto acc = torch::headeronly::CppTypeToScalarType<A>::value;
      FK_CHECK(t.has_value(), "t: a custom schedule's table is missing");
      const Tensor& tab = *t;
      FK_CHECK(tab.dim() == 2 && tab.size(1) == 4 && (tab.size(0) == 1 || tab.size(0) == rows) &&
                   tab.scalar_type() == acc && tab.is_contiguous() &&
                   tab.device() == like.device(),
               "t: a coefficient table must be a contiguous (1 or B, 4) tensor in the "
               "accumulation dtype on the data's device");
      c.table = ptr(tab);
      c.table_rows = tab.size(0);
      return c;
    }
    c.kind = int(kind);
    for (size_t i = 0; i < params.size(); ++i) c.p[i] = params[i];
    if (!t.has_value()) {
      const HostCoef<A> h = host_coef<A>(t, t_value, kind, params, rows, like, check, name);
      if (check) checks(h);
      for (int i = 0; i < 4; ++i) c.one[i] = double(h.table[i]);
      return c;
    }
    check_times(*t, rows, like, name);
    const fk::TimeArg a = time_arg(*t, keep);
    c.t = a.p;
    c.t_rows = a.rows;
    c.t_f64 = a.f64;
    if (check && D::values_on_device_checked()) {
      const Tensor host = to_cpu(*keep);
      checks(host_coef<A>(host, 0.0, kind, params, rows, host, true, name));
    }
    return c;
  }

  static void run_interpolate(const Tensor& a, const Tensor& b, FK_COEF_ARGS,
                              int64_t target, bool check, const Tensor& xt,
                              const Tensor& y) {
    const Launch l(a);
    with_acc(a, [&](auto acc) {
      using A = decltype(acc);
      OptT keep;
      const auto c = train_coef<A>(FK_COEF_PASS, rows_of(a), a, check, keep,
                                   [&](const HostCoef<A>& h) { check_target(h, target); });
      ok(L::interpolate(dtype_code(a), rows_of(a), inner_of(a), ptr(a), ptr(b), c, int(target),
                        ptr(xt), ptr(y), l.stream, l.max_blocks),
         "interpolate");
    });
  }

  static std::tuple<Tensor, Tensor> interpolate(const Tensor& x0,
                                                        const Tensor& x1, FK_COEF_ARGS,
                                                        int64_t target, bool check) {
    check_code("target", target, kPreds);
    const auto shape = common_shape({{"x0", &x0}, {"x1", &x1}});
    const auto a = dense(x0, shape), b = dense(x1, shape);
    auto xt = empty_like_shape(a, shape), y = empty_like_shape(a, shape);
    run_interpolate(a, b, FK_COEF_PASS, target, check, xt, y);
    return {xt, y};
  }

  static void interpolate_out(const Tensor& x0, const Tensor& x1, FK_COEF_ARGS,
                              int64_t target, bool check, Tensor& xt, Tensor& y) {
    check_code("target", target, kPreds);
    const auto shape = common_shape({{"x0", &x0}, {"x1", &x1}});
    check_out("out[0]", xt, shape, x0);
    check_out("out[1]", y, shape, x0);
    check_no_overlap({{"out[0]", &xt}, {"out[1]", &y}}, {{"x0", &x0}, {"x1", &x1}});
    run_interpolate(dense(x0, shape), dense(x1, shape), FK_COEF_PASS, target, check, xt, y);
  }

  static std::tuple<Tensor, Tensor> interpolate_backward(const Tensor& gxt_,
                                                                 const Tensor& gy_,
                                                                 FK_COEF_ARGS, int64_t target) {
    check_code("target", target, kPreds);
    const auto shape = common_shape({{"grad_xt", &gxt_}, {"grad_y", &gy_}});
    const auto gxt = dense(gxt_, shape), gy = dense(gy_, shape);
    auto gx0 = empty_like_shape(gxt, shape), gx1 = empty_like_shape(gxt, shape);
    const Launch l(gxt);
    with_acc(gxt, [&](auto acc) {
      using A = decltype(acc);
      OptT keep;
      const auto c = train_coef<A>(FK_COEF_PASS, rows_of(gxt), gxt, false, keep,
                                   [](const HostCoef<A>&) {});
      ok(L::interpolate_backward(dtype_code(gxt), rows_of(gxt), inner_of(gxt), ptr(gxt),
                                 ptr(gy), c, int(target), ptr(gx0), ptr(gx1), l.stream,
                                 l.max_blocks),
         "interpolate_backward");
    });
    return {gx0, gx1};
  }

  static Tensor convert(const Tensor& pred_, const Tensor& x_, FK_COEF_ARGS,
                            int64_t src, int64_t dst, bool check) {
    check_code("src", src, kPreds);
    check_code("dst", dst, kPreds);
    const auto shape = common_shape({{"pred", &pred_}, {"x_t", &x_}});
    const auto x = dense(x_, shape), pred = dense(pred_, shape);
    auto out = empty_like_shape(x, shape);
    const Launch l(x);
    with_acc(x, [&](auto acc) {
      using A = decltype(acc);
      OptT keep;
      const auto c = train_coef<A>(FK_COEF_PASS, rows_of(x), x, check, keep,
                                   [&](const HostCoef<A>& h) { check_convert(h, src, dst); });
      ok(L::convert(dtype_code(x), rows_of(x), inner_of(x), ptr(x), ptr(pred), c, int(src),
                    int(dst), ptr(out), l.stream, l.max_blocks),
         "convert");
    });
    return out;
  }

  static std::tuple<Tensor, Tensor> convert_backward(const Tensor& g_, FK_COEF_ARGS,
                                                             int64_t src, int64_t dst) {
    check_code("src", src, kPreds);
    check_code("dst", dst, kPreds);
    check_batch("grad", g_);
    const auto g = contig(g_);
    auto gx = empty_like_shape(g, g.sizes()), gp = empty_like_shape(g, g.sizes());
    const Launch l(g);
    with_acc(g, [&](auto acc) {
      using A = decltype(acc);
      OptT keep;
      const auto c =
          train_coef<A>(FK_COEF_PASS, rows_of(g), g, false, keep, [](const HostCoef<A>&) {});
      ok(L::convert_backward(dtype_code(g), rows_of(g), inner_of(g), ptr(g), c, int(src),
                             int(dst), ptr(gx), ptr(gp), l.stream, l.max_blocks),
         "convert_backward");
    });
    return {gp, gx};
  }

  // flow_matching_loss: per-(row, chunk) partial sums, then one block that
  // weighs and reduces them in double into the loss (launch_ops.h fm_loss):
  // two launches, no torch op. The weight is read where it lies. With g_pred
  // (fm_loss_with_grad) the row-sum pass also stores d loss / d pred for a
  // loss gradient of 1.
  static Tensor loss_pass(const Tensor& pred_, const Tensor& x0_, const Tensor& x1_,
                          FK_COEF_ARGS, int64_t target, const OptT& weight, int64_t reduction,
                          bool check, OptT* g_pred) {
    check_code("target", target, kPreds);
    check_reduction(reduction);
    Shape shape;
    const auto [pred, x0, x1] = loss_inputs(pred_, x0_, x1_, shape);
    const i64 rows = rows_of(pred), inner = inner_of(pred);
    OptT keep_w;
    const fk::Reals w = weight_of(weight, rows, pred, keep_w);
    const auto acc_type = pred.scalar_type() == kDouble ? kDouble : kFloat;
    const fk::RowsumPlan plan = fk::plan_rowsum(rows, inner, 0);
    auto partial = empty({rows, plan.nchunks}, acc_type, pred.device());
    Tensor out = empty_like_shape(pred, reduction == NONE ? Shape{rows} : Shape{});
    if (g_pred != nullptr) *g_pred = empty_like_shape(pred, shape);
    const Launch l(pred);
    with_acc(pred, [&](auto acc) {
      using A = decltype(acc);
      OptT keep;
      const auto c = train_coef<A>(FK_COEF_PASS, rows, pred, check, keep,
                                   [&](const HostCoef<A>& h) { check_target(h, target); });
      ok(L::fm_loss(dtype_code(pred), rows, inner, ptr(pred), ptr(x0), ptr(x1), c, int(target),
                    ptr(partial), plan.chunk_len, w, reduction == NONE,
                    loss_denom(reduction, rows, inner), ptr(out),
                    g_pred != nullptr ? ptr(*g_pred) : 0, l.stream),
         "flow_matching_loss");
    });
    return out;
  }

  static Tensor fm_loss(const Tensor& pred, const Tensor& x0, const Tensor& x1, FK_COEF_ARGS,
                        int64_t target, const OptT& weight, int64_t reduction, bool check) {
    return loss_pass(pred, x0, x1, FK_COEF_PASS, target, weight, reduction, check, nullptr);
  }

  static std::tuple<Tensor, Tensor> fm_loss_with_grad(const Tensor& pred, const Tensor& x0,
                                                      const Tensor& x1, FK_COEF_ARGS,
                                                      int64_t target, const OptT& weight,
                                                      int64_t reduction, bool check) {
    OptT g;
    Tensor loss = loss_pass(pred, x0, x1, FK_COEF_PASS, target, weight, reduction, check, &g);
    return {loss, *g};
  }

  // Its gradients: one launch, which reads the loss's gradient and the
  // weight where they lie (fk::LossRowGrad).
  static std::vector<Tensor> fm_loss_backward(const Tensor& grad, const Tensor& pred_,
                                                  const Tensor& x0_, const Tensor& x1_,
                                                  FK_COEF_ARGS, int64_t target,
                                                  const OptT& weight, int64_t reduction,
                                                  int64_t nout) {
    check_code("target", target, kPreds);
    FK_CHECK(nout == 1 || nout == 3, "fm_loss_backward: nout must be 1 or 3");
    check_reduction(reduction);
    Shape shape;
    const auto [pred, x0, x1] = loss_inputs(pred_, x0_, x1_, shape);
    const i64 rows = rows_of(pred), inner = inner_of(pred);
    OptT keep_w, keep_g;
    const fk::LossRowGrad rg = loss_row_grad(grad, weight, reduction, pred, keep_w, keep_g,
                                             "fm_loss_backward");
    std::vector<Tensor> g;
    for (int64_t k = 0; k < nout; ++k) g.push_back(empty_like_shape(pred, shape));
    const Launch l(pred);
    with_acc(pred, [&](auto acc) {
      using A = decltype(acc);
      OptT keep;
      const auto c =
          train_coef<A>(FK_COEF_PASS, rows, pred, false, keep, [](const HostCoef<A>&) {});
      ok(L::fm_loss_backward(dtype_code(pred), rows, inner, rg, ptr(pred), ptr(x0), ptr(x1), c,
                             int(target), ptr(g[0]), nout == 3 ? ptr(g[1]) : 0,
                             nout == 3 ? ptr(g[2]) : 0, l.stream, l.max_blocks),
         "flow_matching_loss backward");
    });
    return g;
  }

  // --------------------------------------------------------------- steps

  // What a step's coefficient argument points into, alive for the launch:
  // the table as the kernel reads it, the times tensors as float32/float64.
  struct StepKeep {
    OptT table, times[3];
  };

  // The coefficients of a step (step_args.h's arguments): a caller's table
  // where it lies; per-sample times tensors where they lie (16-bit ones
  // widened to float32, exactly), which the kernel evaluates (fk::StepSrc);
  // or float times, evaluated here in double. checks(StepCoef) as in
  // train_coef: always for host values, with FLOWKERN_DEBUG=1 for values on
  // the device (a copy to the host).
  template <class A, class Checks>
  static fk::CoefArg step_coef_arg(FK_STEP_ARGS, const Tensor& x, bool check,
                                   StepKeep& keep, Checks&& checks) {
    fk::CoefArg c;
    if (table.has_value()) {
      const StepCoef<A> given = step_coef<A>(FK_STEP_PASS, x, false);  // shape, dtype, device
      keep.table = given.keep;
      c.table = ptr(keep.table);
      c.table_rows = given.n;
      if (check && D::values_on_device_checked()) {
        StepCoef<A> h;
        h.keep = to_cpu(*keep.table);
        h.read_table(static_cast<const A*>(h.keep->const_data_ptr()), given.n);
        checks(h);
      }
      return c;
    }
    if (!step_by_time(t, s, t_prev)) {
      const StepCoef<A> h = step_coef<A>(FK_STEP_PASS, x, check);  // the row, in double
      if (check) checks(h);
      for (int i = 0; i < fk::STEP_COLS; ++i) c.one[i] = double(h.own[size_t(i)]);
      return c;
    }
    check_step_schedule(kind, params, times);
    const i64 rows = rows_of(x);
    c.by_time = true;
    const auto tensors = step_time_tensors(t, s, t_prev);
    if (check) check_step_times(tensors, times, nullptr);  // the floats, always
    c.kind = int(kind);
    for (size_t i = 0; i < params.size(); ++i) c.p[i] = params[i];
    for (int i = 0; i < 4; ++i) c.times[i] = times[size_t(i)];
    OptT host[3];
    for (int i = 0; i < 3; ++i) {
      const OptT& ti = *tensors[size_t(i)];
      if (!ti.has_value()) continue;
      check_times(*ti, rows, x, kStepTimeNames[i]);
      c.step_t[i] = time_arg(*ti, keep.times[i]);
      if (check && D::values_on_device_checked()) host[i] = to_cpu(*keep.times[i]);
    }
    if (check && D::values_on_device_checked()) {
      const Tensor& like = host[0] ? *host[0] : host[1] ? *host[1] : *host[2];
      checks(step_coef<A>(std::nullopt, host[0], host[1], host[2], times, kind, params, x,
                          true, &like));
    }
    return c;
  }

  // The device runner of the step ops (csrc/cpu/step_ops.h): the
  // coefficient argument (step_coef_arg) and one launch of the step launcher.
  struct Steps {
    static bool values_read(bool check) { return check && D::values_on_device_checked(); }
    static Tensor empty(const Tensor& x) { return empty_like_shape(x, x.sizes()); }

    template <int OP, class Checks>
    static void run(const std::vector<Tensor>& in, const std::vector<Tensor*>& outs,
                    const StepTimes* coef, bool check, const fk::StepParams& p,
                    const StepNoise& noise, Checks&& checks) {
      const Tensor& x = in[0];
      const Launch l(x);
      with_acc(x, [&](auto acc) {
        using A = decltype(acc);
        StepKeep keep;
        const fk::CoefArg c =
            coef == nullptr ? fk::CoefArg{}
                            : step_coef_arg<A>(coef->table, coef->t, coef->s, coef->t_prev,
                                               coef->times, coef->kind, coef->params, x,
                                               check, keep, checks);
        uintptr_t ins[8], outp[4];
        FK_CHECK(in.size() <= 8 && outs.size() <= 4);
        for (size_t j = 0; j < in.size(); ++j) ins[j] = ptr(in[j]);
        for (size_t k = 0; k < outs.size(); ++k) outp[k] = ptr(*outs[k]);
        ok(L::step(OP, dtype_code(x), rows_of(x), inner_of(x), ins, int(in.size()), c, p, outp,
                   int(outs.size()), uint64_t(noise.seed), noise.offset, ptr(noise.seeds),
                   l.stream, l.max_blocks),
           fk::step_name(OP));
      });
    }
  };

  // ------------------------------------------------------------- flow map

  // The flow map's coefficients (flowmap_args.h's arguments) as the
  // launchers read them (fk::map_src): a caller's step table where it lies
  // (step_coef_arg), or t and s each as train_coef checks it, a time the host
  // knows by value; the value checks at t as the CPU op's, where values are
  // read.
  struct MapArgs {
    OptT keep_t, keep_s;  // times tensors converted for the kernel, alive for the launch
    StepKeep keep_table;  // a caller's step table
    fk::CoefArg t, s;
  };

  template <class A>
  static MapArgs map_args(FK_MAP_ARGS, const Tensor& x, int64_t prediction, int64_t form,
                          bool check) {
    MapArgs m;
    if (kind == kTableKind) {  // otherwise train_coef checks the schedule
      m.t = step_coef_arg<A>(map_table_arg(t), {}, {}, {}, {}, kind, {}, x, check, m.keep_table,
                             [&](const StepCoef<A>& h) { check_map(h, prediction, form); });
      return m;
    }
    m.t = train_coef<A>(t, t_value, kind, params, rows_of(x), x, check, m.keep_t,
                        [&](const HostCoef<A>& h) { check_map(h, prediction, form); }, "t");
    m.s = train_coef<A>(s, s_value, kind, params, rows_of(x), x, check, m.keep_s,
                        [](const HostCoef<A>&) {}, "s");
    m.t.time = t_value;  // the kernels evaluate the schedule at a time the host knows
    m.s.time = s_value;
    return m;
  }

  // flowmap_loss: per-(row, chunk) partial sums, then one block that weighs
  // and reduces them (launch_ops.h flowmap_loss): two launches, no torch op.
  static Tensor flowmap_loss(const Tensor& x_, const Tensor& pred_, const Tensor& target_,
                             FK_MAP_ARGS, int64_t prediction, int64_t form,
                             const OptT& weight, int64_t reduction, bool check) {
    check_map_codes(prediction, form, reduction);
    const auto [x, pred, target] = map_inputs(x_, pred_, target_);
    const i64 rows = rows_of(x), inner = inner_of(x);
    OptT keep_w;
    const fk::Reals w = weight_of(weight, rows, x, keep_w);
    const auto acc_type = x.scalar_type() == kDouble ? kDouble : kFloat;
    const fk::RowsumPlan plan = fk::plan_rowsum(rows, inner, 0);
    auto partial = flowkern_cpu::empty({rows, plan.nchunks}, acc_type, x.device());
    Tensor out = empty_like_shape(x, reduction == NONE ? Shape{rows} : Shape{});
    const Launch l(x);
    with_acc(x, [&](auto acc) {
      using A = decltype(acc);
      const MapArgs c = map_args<A>(FK_MAP_PASS, x, prediction, form, check);
      ok(L::flowmap_loss(dtype_code(x), rows, inner, ptr(x), ptr(pred), ptr(target), c.t, c.s,
                         int(prediction), int(form), ptr(partial), plan.chunk_len, w,
                         reduction == NONE, loss_denom(reduction, rows, inner), ptr(out),
                         l.stream),
         "flowmap_loss");
    });
    return out;
  }

  // Its gradients: one launch, which reads the loss's gradient and the
  // weight where they lie (fk::LossRowGrad).
  static std::vector<Tensor> flowmap_loss_backward(const Tensor& grad, const Tensor& x_,
                                                   const Tensor& pred_, const Tensor& target_,
                                                   FK_MAP_ARGS, int64_t prediction,
                                                   int64_t form, const OptT& weight,
                                                   int64_t reduction, bool grad_x,
                                                   bool grad_target) {
    check_map_codes(prediction, form, reduction);
    const auto [x, pred, target] = map_inputs(x_, pred_, target_);
    const i64 rows = rows_of(x), inner = inner_of(x);
    OptT keep_w, keep_g;
    const fk::LossRowGrad rg = loss_row_grad(grad, weight, reduction, x, keep_w, keep_g,
                                             "flowmap_loss_backward");
    std::vector<Tensor> g;
    const int n = 1 + int(grad_x) + int(grad_target);
    for (int k = 0; k < n; ++k) g.push_back(empty_like_shape(x, x.sizes()));
    const uintptr_t g_x = grad_x ? ptr(g[1]) : 0;
    const uintptr_t g_target = grad_target ? ptr(g[size_t(n - 1)]) : 0;
    const Launch l(x);
    with_acc(x, [&](auto acc) {
      using A = decltype(acc);
      const MapArgs c = map_args<A>(FK_MAP_PASS, x, prediction, form, false);
      ok(L::flowmap_loss_backward(dtype_code(x), rows, inner, rg, ptr(x), ptr(pred),
                                  ptr(target), c.t, c.s, int(prediction), int(form), ptr(g[0]),
                                  g_x, g_target, l.stream, l.max_blocks),
         "flowmap_loss_backward");
    });
    return g;
  }

  // --------------------------------------------------------------- fields

  static std::tuple<Tensor, Tensor, Tensor> field_mean(const Tensor& x_,
                                                                   const Tensor& ref_,
                                                                   const Tensor& qp_,
                                                                   int64_t kind, double p0,
                                                                   double p1) {
    check_field_args(x_, ref_, qp_, kind);
    FK_CHECK(ref_.device() == x_.device() && qp_.device() == x_.device(),
             "field_mean: ref and qp must be on x's device");
    const auto x = contig(x_), ref = contig(ref_), qp = contig(qp_);
    const i64 B = x.size(0), N = x.size(1), R = ref.size(0);
    const ScalarType acc = qp.scalar_type();
    auto mean = flowkern_cpu::empty({B, N}, acc, x.device()),
         best = flowkern_cpu::empty({B}, acc, x.device()),
         sumexp = flowkern_cpu::empty({B}, acc, x.device());
    if (B == 0) return {mean, best, sumexp};
    const Launch l(x);
    const fk::FieldPlan plan = with_acc(x, [&](auto acc) {
      return fk::plan_fields<decltype(acc)>(B, R, N, 0, l.max_blocks);
    });
    Tensor ws = plan.workspace > 0 ? flowkern_cpu::empty({plan.workspace}, acc, x.device()) : Tensor();
    ok(L::field_mean(dtype_code(x), B, N, R, ptr(x), ptr(ref), ptr(qp), int(kind), p0, p1,
                     ptr(mean), ptr(best), ptr(sumexp), ptr(ws), plan.workspace, plan.splits,
                     l.stream),
       "field_mean");
    return {mean, best, sumexp};
  }

  // Every op above as the kernel of its schema (schemas.h) in library m.
  static void register_all(torch::stable::detail::StableLibrary& m) {
    m.impl("interpolate", TORCH_BOX(&interpolate));
    m.impl("interpolate.nograd", TORCH_BOX(&interpolate));
    m.impl("interpolate_out", TORCH_BOX(&interpolate_out));
    m.impl("interpolate_backward", TORCH_BOX(&interpolate_backward));
    m.impl("convert", TORCH_BOX(&convert));
    m.impl("convert.nograd", TORCH_BOX(&convert));
    m.impl("convert_backward", TORCH_BOX(&convert_backward));
    m.impl("fm_loss", TORCH_BOX(&fm_loss));
    m.impl("fm_loss.nograd", TORCH_BOX(&fm_loss));
    m.impl("fm_loss_with_grad.nograd", TORCH_BOX(&fm_loss_with_grad));
    m.impl("fm_loss_backward", TORCH_BOX(&fm_loss_backward));
    StepOps<Steps>::register_all(m);
    m.impl("flowmap_loss", TORCH_BOX(&flowmap_loss));
    m.impl("flowmap_loss.nograd", TORCH_BOX(&flowmap_loss));
    m.impl("flowmap_loss_backward", TORCH_BOX(&flowmap_loss_backward));
    m.impl("field_mean", TORCH_BOX(&field_mean));
  }
};

// The launcher set `NS` (fk_cuda or fk_sim) as the static functions Glue calls.
#define FK_FORWARD_LAUNCHER(name, params, args) \
  static int name params { return FK_LAUNCHER_NS::name args; }

}  // namespace flowkern_glue
