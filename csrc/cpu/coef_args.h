// The schedule coefficients of a public training op, from its arguments
// (docs/design.md §8): the times — a (B,), (1,) or () tensor `t`,
// or the float `t_value` when `t` is absent — and a built-in schedule
// (kind, params; csrc/include/flowkern/schedules.h), evaluated here in
// double precision and rounded to the accumulation type; or, with kind =
// kTableKind (a user's own schedule), the (n, 4) table in `t` itself. No
// tensor op runs: the table lives in host memory for the kernel's call.
#pragma once

#include <cmath>
#include <vector>

#include "args.h"
#include "flowkern/hd.h"
#include "flowkern/coeffs.h"
#include "flowkern/schedules.h"

namespace flowkern_cpu {

constexpr int64_t kTableKind = -1;

template <class A> struct HostCoef {
  std::vector<A> own;   // the table when built here
  const A* table;       // (n, 4): alpha, sigma, d_alpha, d_sigma
  int64_t n;            // 1 (one row serves the batch) or rows
  int64_t row_step() const { return n == 1 ? 0 : 1; }
  fk::Sched<A> at(int64_t i) const { return fk::load_sched(table, n == 1 ? 0 : i); }
  fk::SchedSrc<A> src() const {  // the functors' view of it
    fk::SchedSrc<A> s;
    s.table = table;
    s.row_step = row_step();
    return s;
  }
};

// A small host tensor's values as doubles (any real dtype, any stride).
inline std::vector<double> read_doubles(const Tensor& x) {
  std::vector<double> v(size_t(x.numel()));
  if (v.empty()) return v;
  const int64_t stride = x.dim() == 0 ? 0 : x.stride(0);
  const auto read = [&](auto tag) {
    using S = decltype(tag);
    const S* p = static_cast<const S*>(x.const_data_ptr());
    if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) {
      if (stride == 1) {  // the usual (B,) times: a loop the compiler vectorises
        for (size_t i = 0; i < v.size(); ++i) v[i] = double(p[i]);
        return;
      }
    }
    for (size_t i = 0; i < v.size(); ++i) {
      if constexpr (std::is_same_v<S, fk::f16> || std::is_same_v<S, fk::bf16>)
        v[i] = double(fk::to_float(p[int64_t(i) * stride]));
      else
        v[i] = double(p[int64_t(i) * stride]);
    }
  };
  switch (x.scalar_type()) {
    case kFloat: read(float{}); break;
    case kDouble: read(double{}); break;
    case kHalf: read(fk::f16{}); break;
    case kBFloat16: read(fk::bf16{}); break;
    case kLong: read(int64_t{}); break;
    case kInt: read(int32_t{}); break;
    case ScalarType::Short: read(int16_t{}); break;
    case ScalarType::Char: read(int8_t{}); break;
    case ScalarType::Byte: read(uint8_t{}); break;
    case kBool: read(bool{}); break;
    default: FK_CHECK_TYPE(false, "expected a real tensor, got ", py_dtype(x.scalar_type()));
  }
  return v;
}

// A times tensor: floating, on the data's device, shape (), (1,) or (rows,).
inline void check_times(const Tensor& tt, int64_t rows, const Tensor& like,
                        const char* name) {
  FK_CHECK_TYPE(is_floating(tt.scalar_type()), name, ": expected a floating tensor, got ",
                py_dtype(tt.scalar_type()));
  FK_CHECK_VALUE(tt.device() == like.device(), name, ": on ", py_device(tt.device()),
                 " but the data is on ", py_device(like.device()));
  const int64_t n = tt.numel();
  FK_CHECK_VALUE(tt.dim() == 0 || (tt.dim() == 1 && (n == 1 || n == rows)), name,
                 ": expected shape () or (", rows, ",) for a batch of ", rows, ", got ",
                 py_shape(tt.sizes()));
}

// The times as doubles: n of them (1 for t_value or a one-element t).
inline std::vector<double> read_times(const OptT& t, double t_value,
                                      int64_t rows, const Tensor& like, const char* name) {
  if (!t.has_value()) return {t_value};
  const Tensor& tt = *t;
  check_times(tt, rows, like, name);
  FK_CHECK(tt.numel() == 0 || tt.is_cpu(), name,
           ": the host table path needs CPU times");
  return read_doubles(tt);
}

// ValueError unless every time lies in [0, 1]; NaN fails. The message of
// flowkern._validate.check_unit_interval, word for word.
inline void check_unit_interval(const char* name, const std::vector<double>& ts) {
  // one pass of vector min, max and sum reductions (a comparison's mask
  // per element does not vectorise here): v * 0 sums to NaN when some v is
  // NaN or infinite, else to 0; the range for the message only when it fails
  double lo = 0, hi = 1, z = 0;
  const double* p = ts.data();
  const size_t n = ts.size();
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(+ : z)
  for (size_t i = 0; i < n; ++i) {  // (std::min's form stays scalar: g++ -fopt-info-vec)
    lo = p[i] < lo ? p[i] : lo;
    hi = p[i] > hi ? p[i] : hi;
    z += p[i] * 0.0;
  }
  if (lo >= 0 && hi <= 1 && z == 0) return;
  lo = INFINITY, hi = -INFINITY;
  bool nan = false;
  for (double v : ts) {
    nan |= std::isnan(v);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  if (nan) lo = hi = NAN;  // torch.aminmax propagates NaN
  FK_CHECK_VALUE(false, name, ": times must lie in [0, 1] (0 = noise, 1 = data); got values in [",
                 lo, ", ", hi, "]");
}

inline void check_schedule(int64_t kind, const std::vector<double>& params) {
  FK_CHECK_VALUE(kind == kTableKind || (kind >= fk::LINEAR && kind <= fk::EDM),
                 "schedule: unknown kind ", kind);
  FK_CHECK_VALUE(params.size() <= size_t(fk::kSchedParams), "schedule: too many params");
}

// The built-in schedule (kind, params) at the times ts, in double, rounded
// to A: one row per time.
template <class A>
HostCoef<A> host_coef_at(const std::vector<double>& ts, int64_t kind,
                         const std::vector<double>& params) {
  HostCoef<A> c;
  double p[fk::kSchedParams] = {0, 0, 0};
  for (size_t i = 0; i < params.size(); ++i) p[i] = params[i];
  c.n = int64_t(ts.size());
  c.own.resize(4 * ts.size());
  // the kind's switch out of the loop; local pointers the loop keeps in registers
  fk::with_sched_kind(int(kind), [&, t = ts.data(), n = ts.size(), own = c.own.data()](auto k) {
    for (size_t i = 0; i < n; ++i) {
      const fk::Sched<double> s = fk::schedule_of<decltype(k)::value>(p, t[i]);
      A* o = own + 4 * i;
      o[0] = A(s.alpha), o[1] = A(s.sigma), o[2] = A(s.d_alpha), o[3] = A(s.d_sigma);
    }
  });
  c.table = c.own.data();
  return c;
}

// check: whether to check the times' range (flowkern._validate: always on
// CPU tensors unless the caller checked them already, e.g. a sampler).
template <class A>
HostCoef<A> host_coef(const OptT& t, double t_value, int64_t kind,
                      const std::vector<double>& params, int64_t rows, const Tensor& like,
                      bool check, const char* name = "t") {
  check_schedule(kind, params);
  HostCoef<A> c;
  if (kind == kTableKind) {
    FK_CHECK(t.has_value(), name, ": a custom schedule's table is missing");
    const Tensor& tab = *t;
    FK_CHECK(tab.dim() == 2 && tab.size(1) == 4 && (tab.size(0) == 1 || tab.size(0) == rows) &&
                 tab.scalar_type() == torch::headeronly::CppTypeToScalarType<A>::value &&
                 tab.is_contiguous() && tab.device() == like.device(),
             name, ": a coefficient table must be a contiguous (1 or B, 4) tensor in the "
                   "accumulation dtype on the data's device");
    c.table = static_cast<const A*>(tab.const_data_ptr());
    c.n = tab.size(0);
    return c;
  }
  const std::vector<double> ts = read_times(t, t_value, rows, like, name);
  if (check) check_unit_interval(name, ts);
  return host_coef_at<A>(ts, kind, params);
}

// ValueError when the value `what` (a function of a row's schedule) is 0 at
// some row: a division the chosen form cannot avoid (flowkern._validate.nonzero).
template <class A, class F>
void check_nonzero(const HostCoef<A>& c, const char* name, const char* what, const char* why,
                   F&& value) {
  for (int64_t i = 0; i < c.n; ++i)
    FK_CHECK_VALUE(value(c.at(i)) != A(0), name, ": ", what, " is 0 at some sample, and ",
                   why);
}

}  // namespace flowkern_cpu
