// The step ops of FK_STEP_OPS (steps.h) as the enum, names and dispatch the
// launchers use: the CPU ops (csrc/cpu/step_ops.h), the CUDA launcher
// (csrc/cuda/launch_ops.h, steps.cu) and its grid simulator
// (csrc/cpu/cuda_sim_*.cpp) all build a step's functor with with_step_fn, so
// the simulator runs exactly the functor the GPU runs. Nothing here names a
// single op: a new step is its functor and its line in FK_STEP_OPS.
// Host-only; no torch, no CUDA headers (docs/design.md §9 "No torch headers
// in .cu files").
#pragma once

#include <type_traits>

#include "steps.h"

namespace fk {

// One id per step op, in FK_STEP_OPS order.
enum StepOp : int {
#define FK_STEP_ENUM(id, name, maker) id,
  FK_STEP_OPS(FK_STEP_ENUM)
#undef FK_STEP_ENUM
  STEP_OP_COUNT
};

// The op's name (its flowkern:: schema's), or nullptr for an unknown id.
inline const char* step_name(int op) {
  static const char* const names[] = {
#define FK_STEP_NAME(id, name, maker) #name,
      FK_STEP_OPS(FK_STEP_NAME)
#undef FK_STEP_NAME
  };
  return op >= 0 && op < STEP_OP_COUNT ? names[op] : nullptr;
}

template <int OP> struct StepMaker;
#define FK_STEP_MAKER(id, name, maker) \
  template <> struct StepMaker<id> { using type = maker; };
FK_STEP_OPS(FK_STEP_MAKER)
#undef FK_STEP_MAKER

// Row stride of a (coef_rows, STEP_COLS) step table for `rows` samples: 0 when
// one row serves the batch (as the CPU ops read a (1, 12) table), STEP_COLS
// for one row per sample, -1 when the table fits neither.
inline i64 step_stride(i64 coef_rows, i64 rows) {
  if (coef_rows == 1) return 0;
  return coef_rows == rows ? STEP_COLS : -1;
}

// Returns f(fn) for OP's functor in accumulation type A reading its
// coefficients from `coef`, built from p (check step_params_valid first).
template <int OP, class A, class F>
decltype(auto) with_step_fn(const StepSrc<A>& coef, const StepParams& p, F&& f) {
  return StepMaker<OP>::type::with(coef, p, f);
}

// Whether p's scalars are in range for OP (the functor's valid()).
template <int OP> bool step_params_valid(const StepParams& p) {
  return StepMaker<OP>::type::valid(p);
}

// Returns f(std::integral_constant<int, OP>{}) for the op of id `op`, or
// `unknown` when no op has that id.
template <class R, class F> R with_step_op(int op, R unknown, F&& f) {
  switch (op) {
#define FK_STEP_CASE(id, name, maker) \
  case id: return f(std::integral_constant<int, id>{});
    FK_STEP_OPS(FK_STEP_CASE)
#undef FK_STEP_CASE
    default: return unknown;
  }
}

}  // namespace fk
