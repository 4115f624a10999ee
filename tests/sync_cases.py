"""The adapter loops the no-sync checks run, one table for both of them:
tests/test_no_sync.py (CPU, in `make test`) and bench/gpu_sync_check.py (a
CUDA device, `make gpu-check`). Case name: "<function or scheduler>[-label]";
k-diffusion cases are the sampler's keyword arguments (noise_sampler=True: a
seeded torch noise sampler; sigma_min, sigma_max and n: sample_dpm_fast's grid, in
place of the sigmas), diffusers cases the scheduler's config."""

K_CASES = {
    "sample_euler": dict(),
    "sample_euler-churn": dict(s_churn=2.0, seed=1),
    "sample_heun": dict(),
    "sample_heun-churn": dict(s_churn=2.0, s_tmin=0.5, seed=2),
    "sample_dpmpp_2m": dict(),
    "sample_euler_ancestral": dict(seed=3),
    "sample_euler_ancestral-noise_sampler": dict(noise_sampler=True),
    "sample_dpm_2": dict(),
    "sample_dpm_2-churn": dict(s_churn=2.0, seed=4),
    "sample_dpm_2_ancestral": dict(seed=5),
    "sample_dpm_2_ancestral-noise_sampler": dict(noise_sampler=True),
    "sample_dpmpp_2s_ancestral": dict(seed=6),
    "sample_dpmpp_2s_ancestral-noise_sampler": dict(noise_sampler=True),
    "sample_dpmpp_sde": dict(seed=7),
    "sample_dpmpp_sde-noise_sampler": dict(noise_sampler=True, eta=0.5),
    "sample_dpmpp_2m_sde": dict(seed=8),
    "sample_dpmpp_2m_sde-heun-noise_sampler": dict(noise_sampler=True, solver_type="heun"),
    "sample_lms": dict(),
    "sample_dpmpp_3m_sde": dict(seed=9),
    "sample_dpmpp_3m_sde-noise_sampler": dict(noise_sampler=True, eta=0.5),
    "sample_lms-order2": dict(order=2),
    "sample_dpm_fast": dict(sigma_min=0.3, sigma_max=10.0, n=7),
    "sample_dpm_fast-eta": dict(sigma_min=0.3, sigma_max=10.0, n=5, eta=1.0, seed=10),
    "sample_dpm_fast-noise_sampler": dict(sigma_min=0.3, sigma_max=10.0, n=4, eta=0.5,
                                          noise_sampler=True),
}
# Not in the table: sample_dpm_adaptive synchronises by design. Its accept/reject
# and next step size come from the error norm of each attempt, read on the host
# (k-diffusion's PID controller reads it too), and each attempt's rows are
# uploaded then.
K_SYNCING = {"sample_dpm_adaptive"}

D_CASES = {
    "FlowMatchEulerDiscreteScheduler": dict(),
    "FlowMatchEulerDiscreteScheduler-shift-karras": dict(shift=3.0, use_karras_sigmas=True),
    "DPMSolverMultistepScheduler-epsilon": dict(prediction_type="epsilon"),
    "DPMSolverMultistepScheduler-sample-karras": dict(prediction_type="sample",
                                                      use_karras_sigmas=True),
    "DPMSolverMultistepScheduler-v_prediction-order1": dict(prediction_type="v_prediction",
                                                            solver_order=1),
    "DPMSolverMultistepScheduler-flow": dict(prediction_type="flow_prediction",
                                             use_flow_sigmas=True, flow_shift=3.0),
    "DPMSolverMultistepScheduler-sde-heun": dict(algorithm_type="sde-dpmsolver++",
                                                 solver_type="heun"),
    "DPMSolverMultistepScheduler-order3": dict(solver_order=3),
    "EulerDiscreteScheduler": dict(),
    "EulerDiscreteScheduler-v-karras": dict(prediction_type="v_prediction",
                                            use_karras_sigmas=True),
    "EulerAncestralDiscreteScheduler": dict(),
    "DDIMScheduler": dict(clip_sample=False),
    "DDIMScheduler-v-trailing": dict(clip_sample=False, prediction_type="v_prediction",
                                     timestep_spacing="trailing"),
    "FlowMatchHeunDiscreteScheduler": dict(shift=3.0),
    "UniPCMultistepScheduler": dict(),
    "UniPCMultistepScheduler-bh1-order3": dict(solver_type="bh1", solver_order=3),
}
