"""What the grid-simulator tests of the CUDA kernels share (test_cuda_sim.py:
training family, test_cuda_sim_steps.py: sampler steps): dtypes and their
128-bit vector widths, the launch shapes, and input tensors that can start
at a misaligned storage offset."""
import math

import torch

import flowkern._C  # noqa: F401  (registers torch.ops.flowkern.*)

OPS = torch.ops.flowkern       # the CPU ops, the ground truth
SIM = torch.ops.flowkern_sim   # the grid simulator's debug ops (test-only namespace)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
WIDE = {torch.float32: 4, torch.float64: 2, torch.float16: 8, torch.bfloat16: 8}
THREADS = 256

# Tails, row boundaries inside chunks and strides, empty tensors.
SHAPES = [(1, 1), (1, 7), (7, 1), (7, 7), (1023, 1), (1, 1023), (7, 1023), (1023, 7),
          (1023, 8), (1023, 16), (1, 4099), (4099, 1), (3, 4099), (2, 4096), (7, 4104),
          (5, 3, 4, 4), (0, 8), (4, 0)]


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(n, shape, dtype, gen, offset=0):
    """n contiguous tensors; with offset > 0 each starts `offset` elements into
    its storage, so its data pointer is not 16-byte aligned."""
    numel = math.prod(shape)
    out = []
    for _ in range(n):
        base = torch.randn(numel + offset, generator=gen, dtype=torch.float64).to(dtype)
        out.append(base[offset:].view(shape))
    return out


def check_plan(plan, shape, dtype, offset, max_blocks):
    """The plan the launcher computes for these pointers (launch.h): 128-bit
    packs iff every pointer is aligned and rows split into whole packs, one
    thread per chunk up to max_blocks blocks, nothing for empty tensors."""
    vec, threads, blocks = plan
    assert threads == THREADS
    chunks = math.prod(shape) // vec
    if chunks == 0:  # empty tensors have null data pointers: nothing to launch
        assert blocks == 0
        return
    aligned = offset == 0 and math.prod(shape[1:]) % WIDE[dtype] == 0
    assert vec == (WIDE[dtype] if aligned else 1)
    full = -(-chunks // threads)
    assert blocks == (min(full, max_blocks) if max_blocks else full)


def assert_within_fp32_ulp(got, want, what):
    """|got - want| <= 1 ulp of fp32 (or of the storage dtype when coarser) at
    want: how close the noisy steps must come to the CPU op."""
    unit = torch.finfo(torch.float32).eps
    if got.dtype in (torch.float16, torch.bfloat16):
        unit = max(unit, torch.finfo(got.dtype).eps)
    g, w = got.double(), want.double()
    tol = unit * torch.clamp(w.abs(), min=torch.finfo(torch.float32).tiny)
    bad = ~((g - w).abs() <= tol)  # NaN fails
    assert not bad.any(), f"{what}: {int(bad.sum())} elements differ by more than 1 ulp"
