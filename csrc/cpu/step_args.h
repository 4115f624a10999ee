// The rules of the sampler-step ops (step_ops.h), for the CPU and the CUDA
// glue alike: a step's coefficient rows on the host
// (StepCoef: a caller's table, or the one row of [t, s, t_prev, g] and a
// built-in schedule, in double), their value checks, and the checks of the
// model outputs and output buffers against x.
#pragma once

#include <array>
#include <cmath>
#include <string>
#include <vector>

#include "args.h"
#include "coef_checks.h"
#include "dispatch.h"
#include "flowkern/steps.h"

namespace flowkern_cpu {

#define FK_STEP_ARGS                                                                  \
  const OptT &table, const OptT &t, const OptT &s, const OptT &t_prev,                     \
      const std::vector<double>&times, int64_t kind, const std::vector<double>&params
#define FK_STEP_PASS table, t, s, t_prev, times, kind, params



// Per-sample seeds of a noisy step (em_step, churn; docs/design.md §4
// "Per-sample seeds"): a (B,) int64 tensor on x's device, each in [0, 2^63)
// like `seed` (values read when `check_values`: always for CPU tensors, with
// FLOWKERN_DEBUG=1 on a GPU). Returns it contiguous, or nullopt without seeds.
inline OptT step_seeds(const OptT& seeds, const Tensor& x, bool check_values) {
  if (!seeds.has_value()) return std::nullopt;
  const Tensor& s = *seeds;
  FK_CHECK_TYPE(s.scalar_type() == kLong, "per_sample_seeds: expected dtype torch.int64, "
                "got ", py_dtype(s.scalar_type()));
  FK_CHECK_VALUE(s.dim() == 1 && s.size(0) == rows_of(x), "per_sample_seeds: expected shape (",
                 rows_of(x), ",) (one seed per sample of x), got ", py_shape(s.sizes()));
  FK_CHECK_VALUE(s.device() == x.device(), "per_sample_seeds: on ", py_device(s.device()),
                 " but x is on ", py_device(x.device()), "; move them to one device");
  Tensor c = contig(s);
  if (check_values) {
    const Tensor h = to_cpu(c);
    const int64_t* p = static_cast<const int64_t*>(h.const_data_ptr());
    for (i64 i = 0; i < h.numel(); ++i)
      FK_CHECK_VALUE(p[i] >= 0, "per_sample_seeds: expected ints in [0, 2^63), got ", p[i],
                     " at sample ", i);
  }
  return c;
}

inline fk::NoiseKey noise_key(int64_t seed, int64_t offset, const OptT& seeds) {
  return {uint64_t(seed), offset,
          seeds ? static_cast<const int64_t*>(seeds->const_data_ptr()) : nullptr};
}

// A step's coefficient rows as the kernels read them (`src`): a (1 or B,
// STEP_COLS) table in the accumulation type, or per-sample times evaluated
// at each row (fk::StepSrc::by_time). Move-only: `src` points into its own
// buffers.
template <class A> struct StepCoef {
  using value_type = A;
  // The table tensor, when given. (Optional: a default-constructed stable
  // Tensor is a shim call and two heap objects, on every step call.)
  OptT keep;
  std::vector<A> own;                        // the one row built here from float times
  std::array<std::vector<double>, 3> times;  // per-sample t, s, t_prev read here
  fk::StepSrc<A> src;
  i64 n = 1;  // rows: 1 (shared by the batch) or B
  StepCoef() = default;
  StepCoef(StepCoef&&) = default;
  StepCoef& operator=(StepCoef&&) = default;
  StepCoef(const StepCoef&) = delete;
  fk::StepRow<A> row(i64 i) const { return src.at(i); }
  // rows read from a table at `ptr` (n of them)
  void read_table(const A* ptr, i64 rows) {
    n = rows;
    src = fk::StepSrc<A>{};
    src.table = ptr;
    src.stride = rows == 1 ? 0 : fk::STEP_COLS;
  }
};

// The times tensors of a step, t, s and t_prev (names in errors).
inline std::array<const OptT*, 3> step_time_tensors(const OptT& t, const OptT& s,
                                                    const OptT& t_prev) {
  return {&t, &s, &t_prev};
}
constexpr const char* kStepTimeNames[3] = {"t", "s", "t_prev"};

// Whether a step's times come as tensors (per-sample times), with no table.
inline bool step_by_time(const OptT& t, const OptT& s, const OptT& t_prev) {
  return t.has_value() || s.has_value() || t_prev.has_value();
}

// A step's schedule without a table: built in, and its four float times.
inline void check_step_schedule(int64_t kind, const std::vector<double>& params,
                                const std::vector<double>& times) {
  check_schedule(kind, params);
  FK_CHECK_VALUE(kind != kTableKind, "table: a custom schedule's step table is missing");
  FK_CHECK(times.size() == 4, "times: expected [t, s, t_prev, g]");
}

// The range check of a step's times (flowkern._validate's rule): the floats
// in `times` always (t_prev unless NaN, absent); the tensors' values where
// `values` holds them (null: not read here, as on the device).
inline void check_step_times(const std::array<const OptT*, 3>& tensors,
                             const std::vector<double>& times,
                             const std::array<std::vector<double>, 3>* values) {
  for (size_t i = 0; i < 3; ++i) {
    if (tensors[i]->has_value()) {
      if (values != nullptr) check_unit_interval(kStepTimeNames[i], (*values)[i]);
    } else if (i < 2 || !std::isnan(times[2])) {
      check_unit_interval(kStepTimeNames[i], {times[i]});
    }
  }
}

// A step's coefficient rows on the host: the caller's table; or the
// built-in schedule at the times, in double, rounded to A — the one row,
// built here, when every time is a float (times = [t, s, t_prev, g]), else
// evaluated at each row of the times tensors t, s, t_prev (each (), (1,) or
// (B,), floating, on x's device, on the host here: the CUDA glue passes host
// copies or none) where the row is read.
// check: range-check the times (flowkern._validate's rule).
// times_like: the device the times tensors must be on, when not x's (the
// CUDA glue's host copies).
template <class A>
inline StepCoef<A> step_coef(FK_STEP_ARGS, const Tensor& x, bool check,
                             const Tensor* times_like = nullptr) {
  StepCoef<A> c;
  const i64 rows = rows_of(x);
  const auto acc = torch::headeronly::CppTypeToScalarType<A>::value;
  if (table.has_value()) {
    FK_CHECK_VALUE(!step_by_time(t, s, t_prev), "table: give a step table or the times "
                   "t, s, t_prev as tensors, not both");
    Tensor tab = *table;
    FK_CHECK_VALUE(tab.dim() == 1 || tab.dim() == 2, "table: expected shape (",
                   fk::STEP_COLS, ",), (1, ", fk::STEP_COLS, ") or (", rows, ", ",
                   fk::STEP_COLS, "), got ", py_shape(tab.sizes()));
    // a 1-D table is read as (-1, STEP_COLS) rows once contiguous: the
    // kernels take a pointer and a row count, so no view op (a dispatcher
    // call, ~1 us of a ~4 us step on small tensors) is needed
    i64 n = -1;
    if (tab.dim() == 1 && tab.numel() % fk::STEP_COLS == 0) n = tab.numel() / fk::STEP_COLS;
    else if (tab.dim() == 2 && tab.size(1) == fk::STEP_COLS) n = tab.size(0);
    FK_CHECK_VALUE(n == 1 || (n >= 0 && n == rows),
                   "table: expected shape (", fk::STEP_COLS, ",), (1, ", fk::STEP_COLS,
                   ") or (", rows, ", ", fk::STEP_COLS, "), got ",
                   py_shape(table->sizes()));
    if (tab.scalar_type() != acc || tab.device() != x.device())
      tab = torch::stable::to(tab, acc, std::nullopt, x.device());
    c.keep = contig(tab);
    c.read_table(static_cast<const A*>(c.keep->const_data_ptr()), n);
    return c;
  }
  check_step_schedule(kind, params, times);
  // the times: each a tensor's values (1 or rows of them, as doubles) or its
  // float; the schedule is evaluated at a row where the row is read
  // (fk::StepSrc::timed: per row in the kernel, no table)
  fk::StepSrc<A>& src = c.src;
  src.by_time = true;
  src.kind = int(kind);
  for (size_t i = 0; i < params.size(); ++i) src.p[i] = params[i];
  src.g = times[3];
  const auto tensors = step_time_tensors(t, s, t_prev);
  fk::TimeSrc* dst[3] = {&src.t, &src.s, &src.t_prev};
  for (size_t i = 0; i < 3; ++i) {
    dst[i]->value = times[i];
    const OptT& ti = *tensors[i];
    if (!ti.has_value()) continue;
    std::vector<double>& v = c.times[i];
    v = read_times(ti, 0.0, rows, times_like ? *times_like : x, kStepTimeNames[i]);
    dst[i]->p = v.data();
    dst[i]->f64 = true;
    dst[i]->step = v.size() == 1 ? 0 : 1;
    if (v.size() != 1) c.n = i64(v.size());
  }
  if (check) check_step_times(tensors, times, &c.times);
  if (!step_by_time(t, s, t_prev)) {  // float times: the one row, evaluated here once
    c.own.resize(fk::STEP_COLS);
    fk::store_step(src.timed(0), c.own.data());
    c.read_table(c.own.data(), 1);
  }
  return c;
}

// ValueError unless `value(row)` is nonzero at every row (flowkern._validate.nonzero).
template <class A, class F>
inline void check_rows(const StepCoef<A>& c, const std::string& name, const std::string& what,
                const std::string& why, F&& value) {
  for (i64 i = 0; i < c.n; ++i)
    FK_CHECK_VALUE(value(c.row(i)) != A(0), name, ": ", what, " is 0 at some sample, and ",
                   why);
}

// The divisions converting `pred` to `dst` needs at time t or s: kDivides
// (coef_checks.h), the training ops' rule (flowkern._rules.DIVIDES for the
// Python backends).
template <class A>
inline void check_conversion(const StepCoef<A>& c, int64_t pred, int dst, bool at_s = false) {
  if (pred == dst) return;
  static const char* names[] = {"velocity", "x1", "eps", "score"};
  const std::string at = at_s ? "s" : "t";
  const std::string why =
      std::string("converting ") + names[pred] + " -> " + names[dst] + " divides by it";
  const auto sched = [at_s](const fk::StepRow<A>& r) { return at_s ? r.s : r.t; };
  // a conversion to or from velocity reads d_alpha, d_sigma (vp's d_sigma is
  // -inf at t = 1): first, as check_convert (coef_checks.h) and
  // flowkern/ops/steps.py _nonzero_for, one message on every backend
  if (pred == fk::VELOCITY || dst == fk::VELOCITY)
    for (i64 i = 0; i < c.n; ++i) {
      const auto q = sched(c.row(i));
      FK_CHECK_VALUE(std::isfinite(double(q.d_alpha)) && std::isfinite(double(q.d_sigma)),
                     at, ": d_alpha_", at, " or d_sigma_", at, " is not finite at some "
                     "sample (vp's d_sigma at t = 1), and converting ", names[pred], " -> ",
                     names[dst], " reads them");
    }
  const int need = kDivides[pred][dst];
  if (need & BY_SIGMA)
    check_rows(c, at, "sigma_" + at, why, [&](const fk::StepRow<A>& r) { return sched(r).sigma; });
  if (need & BY_ALPHA)
    check_rows(c, at, "alpha_" + at, why, [&](const fk::StepRow<A>& r) { return sched(r).alpha; });
  if (need & BY_DET)
    check_rows(c, at, "alpha*d_sigma - sigma*d_alpha", why, [&](const fk::StepRow<A>& r) {
      const auto q = sched(r);
      return q.alpha * q.d_sigma - q.sigma * q.d_alpha;
    });
}

template <class A> inline void check_sigma_t(const StepCoef<A>& c, const char* why) {
  check_rows(c, "t", "sigma_t", why, [](const fk::StepRow<A>& r) { return r.t.sigma; });
}
template <class A> inline void check_alpha_t(const StepCoef<A>& c, const char* why) {
  check_rows(c, "t", "alpha_t", why, [](const fk::StepRow<A>& r) { return r.t.alpha; });
}

// A model output (or other input) of x's shape, dtype and device.
// The direction of a noisy step, from its rows' h = s - t: em_step
// integrates forward (h >= 0: sqrt(h) scales its noise), churn renoises to an
// earlier time (t_hat <= t, h <= 0). NaN fails.
template <class A> inline void check_step_direction(const StepCoef<A>& c, bool forward) {
  for (i64 i = 0; i < c.n; ++i) {
    const A h = c.row(i).h;
    if (forward) {
      FK_CHECK_VALUE(h >= A(0), "s: em_step integrates forward in time and needs s >= t; "
                     "got s - t = ", double(h));
    } else {
      FK_CHECK_VALUE(h <= A(0), "t_hat: churn renoises to an earlier time and needs "
                     "t_hat <= t; got t_hat - t = ", double(h));
    }
  }
}

// A step's host weights (lms_step, lincomb_step): finite, checked always.
inline void check_finite_weights(const std::vector<double>& weights) {
  for (size_t j = 0; j < weights.size(); ++j)
    FK_CHECK_VALUE(std::isfinite(weights[j]), "weights: expected finite weights, got ",
                   weights[j], " at ", j);
}

// lms_step's history u1 (newest), u2, u3: none after an absent one; and its
// weights, one for u_t and one per earlier velocity, finite (host floats:
// checked always). Returns the history's length.
inline int lms_history(const OptT& u1, const OptT& u2, const OptT& u3,
                       const std::vector<double>& weights) {
  FK_CHECK_VALUE(u1.has_value() || !u2.has_value(), "u2: give u1 (the newest earlier "
                 "velocity) before u2");
  FK_CHECK_VALUE(u2.has_value() || !u3.has_value(), "u3: give u2 before u3");
  const int nh = int(u1.has_value()) + int(u2.has_value()) + int(u3.has_value());
  FK_CHECK_VALUE(weights.size() == size_t(nh + 1), "weights: expected ", nh + 1,
                 " weights (one for u_t and one per earlier velocity), got ",
                 weights.size());
  check_finite_weights(weights);
  return nh;
}

// lincomb_step's terms (1 .. LINCOMB_MAX_TERMS tensors), its weights (one for
// x and one per term) and noise_std, finite (host floats: checked always).
// Returns the number of terms.
inline int lincomb_terms(const std::vector<Tensor>& terms, const std::vector<double>& weights, double noise_std) {
  const int nt = int(terms.size());
  FK_CHECK_VALUE(nt >= 1 && nt <= fk::LINCOMB_MAX_TERMS, "terms: expected 1 to ",
                 fk::LINCOMB_MAX_TERMS, " tensors, got ", nt);
  FK_CHECK_VALUE(weights.size() == size_t(nt + 1), "weights: expected ", nt + 1,
                 " weights (one for x and one per term), got ", weights.size());
  check_finite_weights(weights);
  FK_CHECK_VALUE(std::isfinite(noise_std) && noise_std >= 0, "noise_std: expected a finite "
                 "value >= 0, got ", noise_std);
  FK_CHECK_VALUE(noise_std == 0 || nt <= fk::LINCOMB_MAX_NOISY_TERMS, "terms: at most ",
                 fk::LINCOMB_MAX_NOISY_TERMS, " with the in-kernel noise (noise_std > 0), got ",
                 nt, "; a noise tensor of your own can be a term");
  return nt;
}

// The names of lincomb_step's terms in error messages.
inline const char* term_name(int k) {
  static const char* const names[] = {"terms[0]", "terms[1]", "terms[2]", "terms[3]"};
  return names[k];
}

inline void check_like_x(const char* name, const Meta& p, const Meta& x) {
  FK_CHECK_VALUE(same_sizes(p.sizes, x.sizes) && p.same_place(x),
                 name, ": the model output must match the state x in shape, dtype and "
                       "device; got ", py_shape(p.sizes), " ", py_dtype(p.t->scalar_type()), " ",
                 py_device(p.t->device()), ", x is ", py_shape(x.sizes), " ",
                 py_dtype(x.t->scalar_type()), " ", py_device(x.t->device()));
}

inline void check_step_out(const char* name, const Meta& o, const Meta& x) {
  FK_CHECK_VALUE(same_sizes(o.sizes, x.sizes) && o.same_place(x),
                 name, ": must match x in shape, dtype and device");
  FK_CHECK_VALUE(o.contiguous, name, ": must be contiguous");
}

inline void check_form(int64_t form) {
  FK_CHECK_VALUE(form == fk::EI_DATA || form == fk::EI_NOISE, "form: code ", form,
                 " is out of range [0, 2)");
}

inline const Tensor* opt(const OptT& t) { return t.has_value() ? &*t : nullptr; }

// The dense inputs of a step: x then the named others (absent ones, nullptr,
// dropped), after checking them and the outputs against x. Each tensor's
// metadata is read once (Meta).
inline std::vector<Tensor> step_inputs(
    const Tensor& x, std::initializer_list<std::pair<const char*, const Tensor*>> others,
    std::initializer_list<std::pair<const char*, const Tensor*>> outs) {
  constexpr size_t kMaxIn = 8, kMaxOut = 2;  // lms_step: x + 5 others; 2 outputs
  FK_CHECK(others.size() < kMaxIn && outs.size() <= kMaxOut, "step_inputs: too many tensors");
  check_batch("x", x);
  std::array<NamedMeta, kMaxIn> ins;
  std::array<NamedMeta, kMaxOut> out_metas;
  size_t n_in = 0, n_out = 0;
  ins[n_in++] = {"x", meta_of(x)};
  const Meta& mx = ins[0].second;
  std::vector<Tensor> in{mx.contiguous ? x : torch::stable::contiguous(x)};
  for (const auto& [name, t] : others) {
    if (t == nullptr) continue;
    ins[n_in] = {name, meta_of(*t)};
    check_like_x(name, ins[n_in].second, mx);
    in.push_back(ins[n_in].second.contiguous ? *t : torch::stable::contiguous(*t));
    ++n_in;
  }
  for (const auto& [name, o] : outs) {
    out_metas[n_out] = {name, meta_of(*o)};
    check_step_out(name, out_metas[n_out].second, mx);
    ++n_out;
  }
  check_no_overlap(out_metas.data(), n_out, ins.data(), n_in);
  return in;
}

// lincomb_step's dense inputs (x, then the terms) after the checks of step_inputs.
inline std::vector<Tensor> lincomb_inputs(const Tensor& x, const std::vector<Tensor>& terms,
                                              const Tensor& out) {
  static_assert(fk::LINCOMB_MAX_TERMS == 4, "one entry per term below");
  const auto term = [&](size_t k) { return k < terms.size() ? &terms[k] : nullptr; };
  return step_inputs(x, {{term_name(0), term(0)}, {term_name(1), term(1)},
                         {term_name(2), term(2)}, {term_name(3), term(3)}},
                     {{"out", &out}});
}

}  // namespace flowkern_cpu
