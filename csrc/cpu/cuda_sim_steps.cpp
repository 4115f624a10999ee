// CPU grid simulator of the CUDA sampler-step kernels (csrc/cuda/steps.cu):
// a debug op that builds a step's functor with the launchers' own
// fk::with_step_fn (flowkern/step_launch.h) and sweeps fk::lincomb_thread over
// every block and thread of the launch plan (cuda_sim.h), noise included.

#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cuda_sim.h"
#include "dispatch.h"
#include "flowkern/step_launch.h"
#include "step_args.h"

namespace flowkern_cpu {
namespace {

// Calls f(std::integral_constant<int, OP>{}) for the step op of that name.
template <class F> void with_step_op(const std::string& op, F&& f) {
  for (int id = 0; id < fk::STEP_OP_COUNT; ++id)
    if (op == fk::step_name(id))
      return void(fk::with_step_op(id, 0, [&](auto c) { return f(c), 0; }));
  FK_CHECK(false, "_sim_step: unknown op '", op, "'");
}

// inputs: the tensors the launcher passes to the kernel, in its order (absent
// optionals dropped; dpmpp_2m_step's third is x when first order); variant:
// the EI form, DPM second-order flag, lms_step's history count or
// lincomb_step's term count; cfg: the guided instantiation; weights: lms_step's
// or lincomb_step's; noise_std: lincomb_step's (nonzero: the noise term).
std::tuple<std::vector<Tensor>, sim::Plan> sim_step(
    const std::string& op, const std::vector<Tensor>& inputs, const Tensor& coef,
    int64_t prediction, int64_t variant, bool cfg, double guidance, int64_t seed,
    int64_t offset, int64_t max_blocks, int64_t out_offset, const OptT& seeds,
    const std::vector<double>& weights, double noise_std) {
  const std::string what = "_sim_step(" + op + ")";
  sim::check_same(inputs, what.c_str());
  const Tensor& x = inputs[0];
  const auto acc = x.scalar_type() == kDouble ? kDouble : kFloat;
  const i64 stride = coef.dim() == 2 ? fk::step_stride(coef.size(0), rows_of(x)) : -1;
  FK_CHECK(coef.scalar_type() == acc && coef.is_contiguous() && coef.dim() == 2 &&
               coef.size(1) == fk::STEP_COLS && stride >= 0,
           what, ": coef must be a contiguous (1 or B, ", fk::STEP_COLS,
           ") step table in the accumulation dtype");
  FK_CHECK(prediction >= fk::VELOCITY && prediction <= fk::SCORE, what,
           ": unknown prediction ", prediction);
  fk::StepParams p{int(prediction), int(variant), cfg, guidance};
  FK_CHECK(weights.size() <= size_t(fk::STEP_MAX_WEIGHTS), what, ": at most ",
           fk::STEP_MAX_WEIGHTS, " weights");
  for (size_t j = 0; j < weights.size(); ++j) p.wts[j] = weights[j];
  p.noise_std = noise_std;
  const OptT seeds_c = step_seeds(seeds, x, true);
  const fk::NoiseKey key = noise_key(seed, offset, seeds_c);
  std::vector<Tensor> outs;
  sim::Plan plan;
  dispatch_dtype(x, what.c_str(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    with_step_op(op, [&](auto id) {
      FK_CHECK(fk::step_params_valid<decltype(id)::value>(p), what,
               ": variant, cfg or weights out of range for the op");
      fk::with_step_fn<decltype(id)::value>(fk::StepSrc<A>{cptr<A>(coef), stride}, p, [&](auto fn) {
        plan = sim::sweep_into<T>(fn, what, inputs, max_blocks, out_offset, outs, key);
      });
    });
  });
  return {outs, plan};
}

}  // namespace

// Debug op for tests, in the test-only flowkern_sim:: namespace (with the
// simulated CUDA glue, cuda_sim_glue.cpp), not the public flowkern::. Returns the outputs and the
// plan (vec, threads, blocks) so a test can assert which path it exercised.
STABLE_TORCH_LIBRARY_FRAGMENT(flowkern_sim, m) {
  m.def(
      "_sim_step(str op, Tensor[] inputs, Tensor coef, int prediction=0, int variant=0, "
      "bool cfg=False, float guidance=1.0, int seed=0, int offset=0, int max_blocks=0, "
      "int out_offset=0, Tensor? seeds=None, float[] weights=[], float noise_std=0.0) -> "
      "(Tensor[], int[])");
}

STABLE_TORCH_LIBRARY_IMPL(flowkern_sim, CPU, m) { m.impl("_sim_step", TORCH_BOX(&sim_step)); }

}  // namespace flowkern_cpu
