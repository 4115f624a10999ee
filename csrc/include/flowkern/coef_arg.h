// The coefficients of a launch as the CUDA launchers receive them
// (csrc/cuda/launchers.h): plain values, no torch and no CUDA types, so that
// the g++-compiled glue (csrc/cuda/glue.h) and the nvcc-compiled launchers
// share one layout. Exactly one source is used (docs/design.md §8):
//   - `table` (device memory, table_rows x 4 or x STEP_COLS, accumulation
//     dtype; 1 row for the batch or one per row): a custom schedule, or a
//     step table the caller built;
//   - `t` (device memory, t_rows times, float32 or float64 as t_f64 says)
//     with the built-in schedule (kind, p): training ops and the flow map
//     (one CoefArg for t, one for s) with per-sample times;
//   - `by_time`: a step's times t, s, t_prev (`step_t`: device memory, 1 or
//     rows times, float32 or float64; or, without a pointer, the value in
//     `times`) with g (`times[3]`) and the built-in schedule (kind, p),
//     evaluated in the kernel (step_src): per-sample times given as tensors;
//   - `one`, one row by value (its first 4 values for a training op): a time
//     or step the host knows, evaluated there in double; or, for the flow
//     map, `time` itself, which its kernels evaluate (map_src).
#pragma once

#include <stdint.h>

#include "flowmap.h"
#include "schedules.h"
#include "steps.h"

namespace fk {

// One time argument of a step in device memory (CoefArg::step_t).
struct TimeArg {
  uintptr_t p = 0;
  i64 rows = 0;
  bool f64 = false;
};

struct CoefArg {
  uintptr_t table = 0;
  i64 table_rows = 0;
  uintptr_t t = 0;
  i64 t_rows = 0;
  bool t_f64 = false;
  int kind = 0;
  double p[kSchedParams] = {0, 0, 0};
  double one[STEP_COLS] = {};
  double time = 0;  // the flow map: a time the host knows (map_src)
  bool by_time = false;     // a step's per-row times (step_src)
  TimeArg step_t[3];        // ... t, s, t_prev where given as tensors
  double times[4] = {};     // ... [t, s, t_prev, g] by value (t_prev NaN: absent)
};

// 0 when n rows of coefficients serve `rows` rows by broadcasting one row,
// 1 when there is one per row, -1 when neither.
inline i64 row_step_of(i64 n, i64 rows) { return n == 1 ? 0 : (n == rows ? 1 : -1); }

// The training functors' source (4 coefficients a row); false when a table
// or the times fit neither 1 nor `rows` rows.
template <class A> bool sched_src(const CoefArg& c, i64 rows, SchedSrc<A>& s) {
  s = SchedSrc<A>{};
  if (c.table != 0) {
    s.table = reinterpret_cast<const A*>(c.table);
    s.row_step = row_step_of(c.table_rows, rows);
    return s.row_step >= 0;
  }
  if (c.t != 0) {
    s.t = reinterpret_cast<const void*>(c.t);
    s.t_f64 = c.t_f64;
    s.t_step = row_step_of(c.t_rows, rows);
    s.kind = c.kind;
    for (int i = 0; i < kSchedParams; ++i) s.p[i] = c.p[i];
    return s.t_step >= 0 && c.kind >= LINEAR && c.kind <= EDM;
  }
  s.one = {A(c.one[0]), A(c.one[1]), A(c.one[2]), A(c.one[3])};
  return true;
}

// The step functors' source (STEP_COLS coefficients a row); false when a
// table or a times tensor fits neither 1 nor `rows` rows, or the schedule
// kind is unknown.
template <class A> bool step_src(const CoefArg& c, i64 rows, StepSrc<A>& s) {
  s = StepSrc<A>{};
  if (c.t != 0) return false;
  if (c.table != 0) {
    s.table = reinterpret_cast<const A*>(c.table);
    const i64 step = row_step_of(c.table_rows, rows);
    s.stride = step * STEP_COLS;
    return step >= 0;
  }
  if (c.by_time) {
    s.by_time = true;
    s.kind = c.kind;
    for (int i = 0; i < kSchedParams; ++i) s.p[i] = c.p[i];
    s.g = c.times[3];
    bool ok = c.kind >= LINEAR && c.kind <= EDM;
    TimeSrc* dst[3] = {&s.t, &s.s, &s.t_prev};
    for (int i = 0; i < 3; ++i) {
      TimeSrc& d = *dst[i];
      d.value = c.times[i];
      if (c.step_t[i].p != 0) {
        d.p = reinterpret_cast<const void*>(c.step_t[i].p);
        d.f64 = c.step_t[i].f64;
        d.step = row_step_of(c.step_t[i].rows, rows);
        ok = ok && d.step >= 0;
      }
    }
    return ok;
  }
  for (int i = 0; i < STEP_COLS; ++i) s.one[i] = A(c.one[i]);
  return true;
}

// The flow map's source (flowmap.h MapSrc): a caller's step table in
// `t.table` (1 or rows rows of STEP_COLS), or the schedule of `t` (kind, p)
// at t's and s's times, each its `t` pointer or, without one, its `time`.
// False when a table or times fit neither 1 nor `rows` rows.
template <class A> bool map_src(const CoefArg& t, const CoefArg& s, i64 rows, MapSrc<A>& m) {
  m = MapSrc<A>{};
  if (t.table != 0) {
    const i64 step = row_step_of(t.table_rows, rows);
    m = step_table_src(reinterpret_cast<const A*>(t.table), step);
    return step >= 0;
  }
  bool ok = t.kind >= LINEAR && t.kind <= EDM;
  TimeSrc* dst[2] = {&m.t, &m.s};
  const CoefArg* src[2] = {&t, &s};
  for (int i = 0; i < 2; ++i) {
    const CoefArg& c = *src[i];
    TimeSrc& d = *dst[i];
    d.value = c.time;
    if (c.t != 0) {
      d.p = reinterpret_cast<const void*>(c.t);
      d.f64 = c.t_f64;
      d.step = row_step_of(c.t_rows, rows);
      ok = ok && d.step >= 0;
    }
  }
  m.kind = t.kind;
  for (int i = 0; i < kSchedParams; ++i) m.p[i] = t.p[i];
  return ok;
}

}  // namespace fk
