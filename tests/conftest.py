"""Test configuration.

Without a CUDA device the Triton kernels run under the interpreter on CPU
tensors: TRITON_INTERPRET must be set before triton is imported, so it is set
here, at collection, for the whole session (the AOT tests spawn their own
process without it). With a device (``make gpu-check``) the suite runs the
cuda and triton backends on real kernels.
"""
import os

import torch

DEVICE = os.environ.get("FLOWKERN_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import flowkern  # noqa: E402


def backends_under_test():
    avail = flowkern.available()
    wanted = ("torch", "cpu", "triton") if DEVICE == "cpu" else ("torch", "cuda", "triton")
    return [b for b in wanted if avail[b]]


def dtypes_for(backend):
    base = [torch.float32, torch.float16, torch.bfloat16]
    return base + [torch.float64] if backend in ("torch", "cpu", "triton") else base


@pytest.fixture
def device():
    return torch.device(DEVICE)


def pytest_report_header(config):
    return f"flowkern: device={DEVICE}, backends={backends_under_test()}, available={flowkern.available()}"


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="also run tests marked slow")


def full_run():
    """`make test-full` (pytest --full, or FLOWKERN_TEST_FULL=1): slow tests
    run and the fuzz properties draw 10x more examples."""
    return os.environ.get("FLOWKERN_TEST_FULL") == "1"


def pytest_configure(config):
    # before the test modules are imported: hypothesis settings read it there
    if config.getoption("--full"):
        os.environ["FLOWKERN_TEST_FULL"] = "1"


def pytest_collection_modifyitems(config, items):
    if full_run():
        return
    skip = pytest.mark.skip(reason="slow: run with `make test-full`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
