// CPU kernels of the training op family and the flowkern:: schemas they
// implement. Validation with user-facing messages happens in
// flowkern/ops/training.py; the TORCH_CHECKs here guard direct callers of
// torch.ops.flowkern.*.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>

#include "dispatch.h"
#include "flowkern/training.h"

namespace flowkern_cpu {
namespace {

void check_coef(const at::Tensor& coef, const at::Tensor& x, const char* op) {
  const auto want = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coef.scalar_type() == want, op, ": coef must be ", want, " for ", x.scalar_type(),
              " inputs");
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == rows_of(x) && coef.size(1) == 4, op,
              ": coef must have shape (B, 4)");
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), op,
              ": tensors must share shape and dtype");
}

template <class T, template <class> class FnT, class... Extra>
auto make_fn(const at::Tensor& coef, Extra... extra) {
  using A = fk::acc_t<T>;
  return FnT<A>{cptr<A>(coef), extra...};
}

void interpolate_out(const at::Tensor& x0_, const at::Tensor& x1_, const at::Tensor& coef_,
                     int64_t target, at::Tensor& xt, at::Tensor& y) {
  check_same(x0_, x1_, "interpolate");
  check_same(x0_, xt, "interpolate");
  check_same(x0_, y, "interpolate");
  check_coef(coef_, x0_, "interpolate");
  TORCH_CHECK(xt.is_contiguous() && y.is_contiguous(), "interpolate: outputs must be contiguous");
  const auto x0 = x0_.contiguous(), x1 = x1_.contiguous(), coef = coef_.contiguous();
  dispatch_dtype(x0, "interpolate", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto fn = make_fn<T, fk::InterpolateFn>(coef, int(target));
    run_lincomb<T>(fn, rows_of(x0), inner_of(x0), {{cptr<T>(x0), cptr<T>(x1)}},
                   {{mptr<T>(xt), mptr<T>(y)}});
  });
}

std::tuple<at::Tensor, at::Tensor> interpolate(const at::Tensor& x0, const at::Tensor& x1,
                                               const at::Tensor& coef, int64_t target) {
  auto xt = empty_output(x0);
  auto y = empty_output(x0);
  interpolate_out(x0, x1, coef, target, xt, y);
  return {xt, y};
}

std::tuple<at::Tensor, at::Tensor> interpolate_backward(const at::Tensor& gxt_,
                                                        const at::Tensor& gy_,
                                                        const at::Tensor& coef_,
                                                        int64_t target) {
  check_same(gxt_, gy_, "interpolate_backward");
  check_coef(coef_, gxt_, "interpolate_backward");
  const auto gxt = gxt_.contiguous(), gy = gy_.contiguous(), coef = coef_.contiguous();
  auto gx0 = empty_output(gxt);
  auto gx1 = empty_output(gxt);
  dispatch_dtype(gxt, "interpolate_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto fn = make_fn<T, fk::InterpolateBwdFn>(coef, int(target));
    run_lincomb<T>(fn, rows_of(gxt), inner_of(gxt), {{cptr<T>(gxt), cptr<T>(gy)}},
                   {{mptr<T>(gx0), mptr<T>(gx1)}});
  });
  return {gx0, gx1};
}

at::Tensor convert(const at::Tensor& x_, const at::Tensor& pred_, const at::Tensor& coef_,
                   int64_t src, int64_t dst) {
  check_same(x_, pred_, "convert");
  check_coef(coef_, x_, "convert");
  const auto x = x_.contiguous(), pred = pred_.contiguous(), coef = coef_.contiguous();
  auto out = empty_output(x);
  dispatch_dtype(x, "convert", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto fn = make_fn<T, fk::ConvertFn>(coef, int(src), int(dst));
    run_lincomb<T>(fn, rows_of(x), inner_of(x), {{cptr<T>(x), cptr<T>(pred)}},
                   {{mptr<T>(out)}});
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> convert_backward(const at::Tensor& g_,
                                                    const at::Tensor& coef_, int64_t src,
                                                    int64_t dst) {
  check_coef(coef_, g_, "convert_backward");
  const auto g = g_.contiguous(), coef = coef_.contiguous();
  auto gx = empty_output(g);
  auto gp = empty_output(g);
  dispatch_dtype(g, "convert_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto fn = make_fn<T, fk::ConvertBwdFn>(coef, int(src), int(dst));
    run_lincomb<T>(fn, rows_of(g), inner_of(g), {{cptr<T>(g)}}, {{mptr<T>(gx), mptr<T>(gp)}});
  });
  return {gx, gp};
}

// Per-row sum of (pred - y)^2 in the accumulation dtype, shape (B,).
at::Tensor fm_loss_rows(const at::Tensor& pred_, const at::Tensor& x0_, const at::Tensor& x1_,
                        const at::Tensor& coef_, int64_t target) {
  check_same(pred_, x0_, "fm_loss_rows");
  check_same(pred_, x1_, "fm_loss_rows");
  check_coef(coef_, pred_, "fm_loss_rows");
  const auto pred = pred_.contiguous(), x0 = x0_.contiguous(), x1 = x1_.contiguous();
  const auto coef = coef_.contiguous();
  const i64 rows = rows_of(pred), inner = inner_of(pred);
  const i64 seg = std::max<i64>(1, std::min(inner, kSegment));
  const i64 nseg = inner == 0 ? 1 : (inner + seg - 1) / seg;
  auto partial = at::zeros({rows, nseg}, coef.options());
  dispatch_dtype(pred, "fm_loss_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    auto fn = make_fn<T, fk::LossResidualFn>(coef, int(target));
    A* out = mptr<A>(partial);
    const fk::Ptrs<T, 3> in{{cptr<T>(pred), cptr<T>(x0), cptr<T>(x1)}};
    for_each_segment(rows, inner, [&](i64 r, i64 e0, i64 e1) {
      out[r * nseg + e0 / seg] = fk::rowsum_segment<T>(fn, r, inner, e0, e1, in);
    });
  });
  return partial.sum(1);
}

void check_loss_backward(const at::Tensor& grad_rows, const at::Tensor& pred,
                         const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& coef,
                         const char* op) {
  check_same(pred, x0, op);
  check_same(pred, x1, op);
  check_coef(coef, pred, op);
  TORCH_CHECK(grad_rows.numel() == rows_of(pred) && grad_rows.scalar_type() == coef.scalar_type(),
              op, ": grad_rows must be (B,) in the coefficient dtype");
}

// The loss gradients: NO = 3 gives (g_pred, g_x0, g_x1), NO = 1 g_pred alone.
template <int NO>
std::array<at::Tensor, NO> loss_backward(const at::Tensor& grad_rows_, const at::Tensor& pred_,
                                         const at::Tensor& x0_, const at::Tensor& x1_,
                                         const at::Tensor& coef_, int64_t target,
                                         const char* op) {
  check_loss_backward(grad_rows_, pred_, x0_, x1_, coef_, op);
  const auto pred = pred_.contiguous(), x0 = x0_.contiguous(), x1 = x1_.contiguous();
  const auto coef = coef_.contiguous(), grad_rows = grad_rows_.contiguous();
  std::array<at::Tensor, NO> g;
  for (auto& gk : g) gk = empty_output(pred);
  dispatch_dtype(pred, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    fk::LossBwdFn<A, NO> fn{cptr<A>(coef), cptr<A>(grad_rows), int(target)};
    fk::OutPtrs<T, NO> out;
    for (int k = 0; k < NO; ++k) out.p[k] = mptr<T>(g[k]);
    run_lincomb<T>(fn, rows_of(pred), inner_of(pred),
                   {{cptr<T>(pred), cptr<T>(x0), cptr<T>(x1)}}, out);
  });
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fm_loss_backward(
    const at::Tensor& grad_rows, const at::Tensor& pred, const at::Tensor& x0,
    const at::Tensor& x1, const at::Tensor& coef, int64_t target) {
  auto g = loss_backward<3>(grad_rows, pred, x0, x1, coef, target, "fm_loss_backward");
  return {g[0], g[1], g[2]};
}

at::Tensor fm_loss_backward_pred(const at::Tensor& grad_rows, const at::Tensor& pred,
                                 const at::Tensor& x0, const at::Tensor& x1,
                                 const at::Tensor& coef, int64_t target) {
  return loss_backward<1>(grad_rows, pred, x0, x1, coef, target, "fm_loss_backward_pred")[0];
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowkern, m) {
  m.def("interpolate(Tensor x0, Tensor x1, Tensor coef, int target) -> (Tensor, Tensor)");
  m.def(
      "interpolate_out(Tensor x0, Tensor x1, Tensor coef, int target, Tensor(a!) xt, "
      "Tensor(b!) y) -> ()");
  m.def(
      "interpolate_backward(Tensor grad_xt, Tensor grad_y, Tensor coef, int target) -> "
      "(Tensor, Tensor)");
  m.def("convert(Tensor x, Tensor pred, Tensor coef, int src, int dst) -> Tensor");
  m.def(
      "convert_backward(Tensor grad, Tensor coef, int src, int dst) -> (Tensor, Tensor)");
  m.def("fm_loss_rows(Tensor pred, Tensor x0, Tensor x1, Tensor coef, int target) -> Tensor");
  m.def(
      "fm_loss_backward(Tensor grad_rows, Tensor pred, Tensor x0, Tensor x1, Tensor coef, "
      "int target) -> (Tensor, Tensor, Tensor)");
  m.def(
      "fm_loss_backward_pred(Tensor grad_rows, Tensor pred, Tensor x0, Tensor x1, Tensor coef, "
      "int target) -> Tensor");
}

TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  m.impl("interpolate", &interpolate);
  m.impl("interpolate_out", &interpolate_out);
  m.impl("interpolate_backward", &interpolate_backward);
  m.impl("convert", &convert);
  m.impl("convert_backward", &convert_backward);
  m.impl("fm_loss_rows", &fm_loss_rows);
  m.impl("fm_loss_backward", &fm_loss_backward);
  m.impl("fm_loss_backward_pred", &fm_loss_backward_pred);
}

}  // namespace flowkern_cpu
