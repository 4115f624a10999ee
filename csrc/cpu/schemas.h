// The schemas of the flowkern:: ops that have CUDA kernels, written once:
// the CPU files define them in flowkern:: (training.cpp, steps.cpp,
// flowmap.cpp, fields.cpp), and the simulated CUDA glue
// (cuda_sim_glue.cpp) defines the same ones in flowkern_sim::. X(schema).
#pragma once

#define FK_COEF_SCHEMA "Tensor? t, float t_value, int kind, float[] params"
#define FK_STEP_SCHEMA "Tensor? table, float[] times, int kind, float[] params"

#define FK_TRAINING_SCHEMAS(X)                                                             \
  X("interpolate(Tensor x0, Tensor x1, " FK_COEF_SCHEMA                                   \
    ", int target, bool check) -> (Tensor, Tensor)")                                       \
  X("interpolate.nograd(Tensor x0, Tensor x1, " FK_COEF_SCHEMA                            \
    ", int target, bool check) -> (Tensor, Tensor)")                                       \
  X("interpolate_out(Tensor x0, Tensor x1, " FK_COEF_SCHEMA                               \
    ", int target, bool check, Tensor(a!) xt, Tensor(b!) y) -> ()")                        \
  X("interpolate_backward(Tensor grad_xt, Tensor grad_y, " FK_COEF_SCHEMA                 \
    ", int target) -> (Tensor, Tensor)")                                                   \
  X("convert(Tensor pred, Tensor x_t, " FK_COEF_SCHEMA                                    \
    ", int src, int dst, bool check) -> Tensor")                                           \
  X("convert.nograd(Tensor pred, Tensor x_t, " FK_COEF_SCHEMA                             \
    ", int src, int dst, bool check) -> Tensor")                                           \
  X("convert_backward(Tensor grad, " FK_COEF_SCHEMA ", int src, int dst) -> (Tensor, Tensor)") \
  X("fm_loss(Tensor pred, Tensor x0, Tensor x1, " FK_COEF_SCHEMA                          \
    ", int target, Tensor? weight, int reduction, bool check) -> Tensor")                  \
  X("fm_loss.nograd(Tensor pred, Tensor x0, Tensor x1, " FK_COEF_SCHEMA                   \
    ", int target, Tensor? weight, int reduction, bool check) -> Tensor")                  \
  X("fm_loss_backward(Tensor grad, Tensor pred, Tensor x0, Tensor x1, " FK_COEF_SCHEMA    \
    ", int target, Tensor? weight, int reduction, int nout) -> Tensor[]")

#define FK_STEP_SCHEMAS(X)                                                                 \
  X("euler_step(Tensor x, Tensor pred, Tensor? pred_uncond, " FK_STEP_SCHEMA              \
    ", int prediction, float guidance, bool check, Tensor(a!) out) -> ()")                 \
  X("heun_step(Tensor x, Tensor pred, Tensor x_euler, Tensor pred_euler, "                 \
    "Tensor? pred_uncond, Tensor? pred_euler_uncond, " FK_STEP_SCHEMA                      \
    ", int prediction, float guidance, bool check, Tensor(a!) out) -> ()")                 \
  X("ei_step(Tensor x, Tensor pred, Tensor? pred_uncond, " FK_STEP_SCHEMA                 \
    ", int prediction, int form, float guidance, bool check) -> Tensor")                   \
  X("ei_step.nograd(Tensor x, Tensor pred, Tensor? pred_uncond, " FK_STEP_SCHEMA          \
    ", int prediction, int form, float guidance, bool check) -> Tensor")                   \
  X("ei_step_out(Tensor x, Tensor pred, Tensor? pred_uncond, " FK_STEP_SCHEMA             \
    ", int prediction, int form, float guidance, bool check, Tensor(a!) out) -> ()")       \
  X("ei_step_backward(Tensor grad, " FK_STEP_SCHEMA                                        \
    ", int prediction, int form, float guidance, bool cfg) -> Tensor[]")                   \
  X("dpmpp_2m_step(Tensor x, Tensor pred, Tensor? d_prev, Tensor? pred_uncond, "           \
    FK_STEP_SCHEMA ", int prediction, float guidance, bool check, Tensor(a!) out, "        \
    "Tensor(b!) d_out) -> ()")                                                             \
  X("em_step(Tensor x, Tensor pred, Tensor? pred_uncond, " FK_STEP_SCHEMA                 \
    ", int prediction, float guidance, int seed, int offset, Tensor? per_sample_seeds, "   \
    "bool check, Tensor(a!) out) -> ()")                                                   \
  X("churn(Tensor x, " FK_STEP_SCHEMA ", int seed, int offset, Tensor? per_sample_seeds, " \
    "bool check, Tensor(a!) out) -> ()")                                                   \
  X("lms_step(Tensor x, Tensor pred, Tensor? u1, Tensor? u2, Tensor? u3, "                 \
    "Tensor? pred_uncond, float[] weights, " FK_STEP_SCHEMA                                \
    ", int prediction, float guidance, bool check, Tensor(a!) out, Tensor(b!) u_out) -> ()") \
  X("lincomb_step(Tensor x, Tensor[] terms, float[] weights, float noise_std, int seed, "   \
    "int offset, Tensor? per_sample_seeds, bool check, Tensor(a!) out) -> ()")

#define FK_FLOWMAP_SCHEMAS(X)                                                              \
  X("flowmap_loss_rows(Tensor x, Tensor pred, Tensor target, Tensor coef, int prediction, " \
    "int form) -> Tensor")                                                                 \
  X("flowmap_loss_backward(Tensor grad_rows, Tensor x, Tensor pred, Tensor target, "       \
    "Tensor coef, int prediction, int form, bool grad_x, bool grad_target) -> Tensor[]")

#define FK_FIELD_SCHEMAS(X)                                                                \
  X("field_mean(Tensor x, Tensor ref, Tensor qp, int kind, float p0, float p1) -> "        \
    "(Tensor mean, Tensor best, Tensor sumexp)")

#define FK_DEF_SCHEMA(schema) m.def(schema);
