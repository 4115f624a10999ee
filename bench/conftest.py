"""Shared fixtures of the flowkern benchmark suites (bench/bench_<op family>.py).

* ``roofline`` (session): this machine's copy bandwidth, measured in the same
  run as the benchmarks, and the helpers that turn "bytes an op must move" into
  a roofline time and label each benchmark for ``bench/report.py``.
* ``measure``: times one candidate (warm-up outside the timer; fixed rounds for
  the large cases so ``make bench`` stays short; on CUDA it synchronises at
  the end of every timed call).
* ``device``: where the suites put their tensors: ``FLOWKERN_BENCH_DEVICE``
  (default "cpu"; "cuda" for `make gpu-check`).

Every number the report prints comes from the pytest-benchmark JSON: the
candidates' timings, and what this file stores next to them (``extra_info`` of
each benchmark, ``machine_info["flowkern"]`` for the run).
"""
from __future__ import annotations

import datetime
import os
import shlex
import sys
import time
from dataclasses import dataclass, field

import pytest
import torch

# Cases marked `large` (the 16M-element ones) are timed with a fixed number
# of rounds so that `make bench` stays short; the others use pytest-benchmark's
# calibration (--benchmark-min-rounds / --benchmark-max-time in pytest.ini).
PEDANTIC = dict(rounds=10, warmup_rounds=1, iterations=1)

# Copy-bandwidth probe: two buffers this large (well past any cache), best of
# COPY_REPEATS timed `dst.copy_(src)` after COPY_WARMUP untimed ones.
COPY_BYTES = 128 << 20
COPY_REPEATS = 12
COPY_WARMUP = 2


def bench_device() -> torch.device:
    return torch.device(os.environ.get("FLOWKERN_BENCH_DEVICE", "cpu"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Roofline:
    """Copy bandwidth of this machine, counted as (bytes read + bytes written)
    per second of ``dst.copy_(src)`` into an existing buffer, with torch's
    default thread count. An op that must read R and write W bytes cannot beat
    ``(R + W) / gbps`` on a machine that streams at this rate (write-allocate
    traffic is the same for the op's stores as for copy_'s, so it cancels)."""

    gbps: float
    buffer_bytes: int
    samples_s: list = field(default_factory=list)

    def seconds(self, nbytes: int) -> float:
        """Roofline time of an op that moves `nbytes` (reads + writes)."""
        return nbytes / (self.gbps * 1e9)

    def label(self, benchmark, *, op: str, size: str, n: int, pass_: str, candidate: str,
              order: int, bytes_per_elem: int, counted: str, note: str = "") -> None:
        """Name the benchmark's group (op, size, pass) and store what the
        report needs: the candidate, its order in the table, and the roofline
        time for `bytes_per_elem * n` bytes (`counted` says which arrays)."""
        nbytes = bytes_per_elem * n
        benchmark.group = f"{op} · {size} · {pass_}"
        benchmark.name = candidate
        benchmark.extra_info.update(
            op=op, size=size, n=n, pass_=pass_, candidate=candidate, order=order,
            bytes_per_elem=bytes_per_elem, bytes=nbytes, counted=counted,
            copy_gbps=self.gbps, roofline_s=self.seconds(nbytes), note=note)


def measure_copy_bandwidth(nbytes: int = COPY_BYTES, device=None) -> Roofline:
    device = bench_device() if device is None else device
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(COPY_WARMUP):  # first touch of dst's pages, thread pool start
        dst.copy_(src)
    sync(device)
    samples = []
    for _ in range(COPY_REPEATS):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        samples.append(time.perf_counter() - t0)
    best = min(samples)
    return Roofline(gbps=2 * src.nbytes / best / 1e9, buffer_bytes=src.nbytes, samples_s=samples)


_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_snapshot():
    """(CPU seconds busy machine-wide incl. steal, CPU seconds of this process,
    wall seconds). Linux /proc; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    busy = sum(v) - v[3] - v[4]  # user nice system irq softirq steal (not idle, iowait)
    own = int(st[11]) + int(st[12])  # utime + stime, all threads
    return busy / _TCK, own / _TCK, time.perf_counter()


def other_load(before, after):
    """Average number of cores that other processes (and the hypervisor's
    steal) kept busy between two snapshots: the noise indicator the report
    prints next to each timing."""
    if before is None or after is None or after[2] <= before[2]:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / (after[2] - before[2]))


def _command(config) -> str:
    """The command line of this run, as typed from the invocation directory."""
    args = list(config.invocation_params.args)
    exe = sys.executable
    cwd = str(config.invocation_params.dir)
    if exe.startswith(cwd + os.sep):
        exe = os.path.relpath(exe, cwd)
    argv0 = sys.argv[0] if sys.argv else "pytest"
    if argv0.endswith(os.path.join("pytest", "__main__.py")):
        head = [exe, "-m", "pytest"]
    else:
        head = [os.path.basename(argv0)]
    return shlex.join(head + args)


IDLE_LOAD = 0.15  # cores of other load tolerated beyond the cores our threads leave free


def free_core_limit() -> float:
    """Other-process load (cores) under which each of torch's threads has a
    core of its own (plus IDLE_LOAD of slack)."""
    return max(0, len(os.sched_getaffinity(0)) - torch.get_num_threads()) + IDLE_LOAD


def wait_for_idle(max_wait_s: float, window_s: float = 1.0) -> float:
    """Sleep until, over one `window_s` window, other processes left a core
    free for each torch thread (free_core_limit), or max_wait_s has passed;
    returns the seconds waited."""
    t0 = time.perf_counter()
    limit = free_core_limit()
    while True:
        a = _cpu_snapshot()
        time.sleep(window_s)
        load = other_load(a, _cpu_snapshot())
        if load is None or load < limit or time.perf_counter() - t0 >= max_wait_s:
            return time.perf_counter() - t0


def pytest_addoption(parser):
    group = parser.getgroup("flowkern bench")
    group.addoption("--bench-wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before timing each candidate, wait up to SECONDS until other "
                         "processes leave a core free for each torch thread (for shared "
                         "machines; default 0: do not wait)")
    group.addoption("--bench-threads", type=int, default=0, metavar="N",
                    help="torch.set_num_threads(N) for the whole run (default 0: leave torch's "
                         "default). On a loaded machine N=1 avoids OpenMP barriers waiting on "
                         "a descheduled thread; the report names the thread count")


_RUN: dict = {}


def pytest_configure(config):
    threads = config.getoption("--bench-threads", default=0)
    if threads and threads > 0:
        torch.set_num_threads(threads)
    _RUN["threads_set"] = threads if threads and threads > 0 else None
    _RUN.update(command=_command(config), cwd=str(config.invocation_params.dir),
                started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                loadavg_start=list(os.getloadavg()), t0=time.perf_counter())


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def roofline() -> Roofline:
    r = measure_copy_bandwidth()
    _RUN.update(copy_gbps=r.gbps, copy_buffer_bytes=r.buffer_bytes,
                copy_samples_s=r.samples_s)
    return r


@pytest.fixture
def measure(benchmark, request):
    """measure(fn): time fn() (no arguments). Two untimed calls first
    (allocator, page faults, compiled graphs, lazy imports); a test marked
    `large` gets PEDANTIC's fixed rounds, the others pytest-benchmark's
    calibration. With --bench-wait-idle, first waits for the machine to be
    quiet. Stores `other_load` (cores used by other processes while it was
    timed) in extra_info. Returns fn's last result."""
    large = request.node.get_closest_marker("large") is not None
    max_wait = request.config.getoption("--bench-wait-idle")
    dev = bench_device()

    def run(fn):
        if dev.type == "cuda":
            op = fn

            def fn():
                result = op()
                torch.cuda.synchronize(dev)
                return result
        if max_wait > 0:
            benchmark.extra_info["waited_idle_s"] = wait_for_idle(max_wait)
        fn()
        fn()
        before = _cpu_snapshot()
        if large:
            result = benchmark.pedantic(fn, **PEDANTIC)
        else:
            result = benchmark(fn)
        benchmark.extra_info["other_load"] = other_load(before, _cpu_snapshot())
        return result
    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        import flowkern
        from flowkern.backend import resolve
        fk_version = flowkern.__version__
        fk_backend = resolve(None, bench_device())
    except Exception as exc:  # the report still names the machine
        fk_version, fk_backend = f"unavailable ({exc})", None
    peers = {}
    for mod in ("flow_matching", "torchcfm"):
        try:
            peers[mod] = getattr(__import__(mod), "__version__", "installed")
        except Exception:
            peers[mod] = None
    dev = bench_device()
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    machine_info["flowkern"] = dict(
        _RUN, device=str(dev), gpu=gpu, t0=None, wall_s=time.perf_counter() - _RUN.get("t0", time.perf_counter()),
        loadavg_end=list(os.getloadavg()), nproc=len(os.sched_getaffinity(0)),
        torch=torch.__version__, torch_threads=torch.get_num_threads(),
        flowkern=fk_version, flowkern_backend_auto=fk_backend, peers=peers)
