"""Builds flowkern's native modules (docs/build.md).

flowkern._C, on torch's stable ABI (TORCH_TARGET_VERSION below) and CPython's
limited API, so that one cp310-abi3 wheel serves every torch and CPython from
those versions up:
- Always: the CPU kernels and the op schemas (g++, OpenMP, -O3),
  and the CUDA glue on the grid simulator (the flowkern_sim:: test ops).
- When the torch it builds against has CUDA and nvcc is found: the CUDA
  kernels (csrc/cuda/*.cu, nvcc for sm_80, sm_90 and compute_90 PTX, cudart
  linked statically) and their CUDA-key registration (csrc/cuda/register.cpp).
  The .cu files include no torch header: the launchers take device pointers
  and the stream as integers, and the g++-compiled glue (csrc/cuda/glue.h)
  calls them. Against a CPU-only torch, without nvcc, or with
  FLOWKERN_SKIP_CUDA=1, the module has the CPU kernels only.

flowkern._nograd, on torch's regular C++ API: the Autograd-key kernel of the
no-derivative ops, which the stable ABI cannot express. It is bound to the
torch it is built against and loaded only there (flowkern/_native.py).
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(ROOT, "csrc", "include")
CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def find_nvcc():
    if os.environ.get("FLOWKERN_SKIP_CUDA") == "1":
        print("flowkern: FLOWKERN_SKIP_CUDA=1, building the CPU kernels only", file=sys.stderr)
        return None
    import torch
    if torch.version.cuda is None:
        print(f"flowkern: torch {torch.__version__} has no CUDA, building the CPU kernels only",
              file=sys.stderr)
        return None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
            cand = os.path.join(home, "bin", "nvcc") if home else None
            if cand and os.path.exists(cand):
                nvcc = cand
                break
    if nvcc is None:
        print("flowkern: nvcc not found, building the CPU kernels only "
              "(the cuda backend will be unavailable; triton and cpu are unaffected)",
              file=sys.stderr)
    return nvcc


class Build(BuildExtension):
    """BuildExtension that first compiles the extension's .cu files with nvcc."""

    def build_extension(self, ext):
        if getattr(ext, "cu_sources", None):
            self._compile_cuda_objects(ext)
        super().build_extension(ext)
        if self.inplace:
            self._remove_stale_modules(ext)

    def _remove_stale_modules(self, ext):
        """An in-place build leaves an older build's module of another ABI tag
        (flowkern/_C.cpython-311-*.so beside the new _C.abi3.so), which Python
        would import first: remove it."""
        built = os.path.realpath(self.get_ext_fullpath(ext.name))
        stem = os.path.join(os.path.dirname(built), ext.name.rpartition(".")[2])
        for path in glob.glob(stem + ".*.so"):
            if os.path.realpath(path) != built:
                print(f"flowkern: removing the stale {os.path.relpath(path, ROOT)}")
                os.remove(path)

    def _compile_cuda_objects(self, ext):
        """nvcc on every .cu, two at a time; an object newer than its source and
        every header is kept (nvcc has no dependency tracking here)."""
        nvcc = ext.nvcc
        out_dir = os.path.join(self.build_temp, "cuda_objects")
        os.makedirs(out_dir, exist_ok=True)
        # what the .cu files include: the torch-free headers and csrc/cuda's own
        headers = glob.glob(os.path.join(ROOT, "csrc", "include", "**", "*.h"), recursive=True) + \
            glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.h")) + \
            glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh"))
        newest_header = max((os.path.getmtime(h) for h in headers), default=0)
        objects, todo = [], []
        for src in ext.cu_sources:
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            objects.append(obj)
            if (os.path.exists(obj) and os.path.getmtime(obj) >
                    max(newest_header, os.path.getmtime(os.path.join(ROOT, src)))):
                continue
            todo.append([nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-I", INCLUDE,
                         "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", *CUDA_ARCH_FLAGS])
        jobs = max(1, min(len(todo), os.cpu_count() or 1))
        while todo:
            batch, todo = todo[:jobs], todo[jobs:]
            procs = []
            for cmd in batch:
                print(" ".join(cmd))
                procs.append((cmd, subprocess.Popen(cmd, cwd=ROOT)))
            for cmd, p in procs:
                if p.wait() != 0:
                    raise subprocess.CalledProcessError(p.returncode, cmd)
        ext.extra_objects = objects + list(ext.extra_objects or [])


def nvcc_top(nvcc):
    """The CUDA root nvcc itself uses: nvcc on the PATH may be a wrapper script
    (it is on the dev machines), so its own location proves nothing."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return line.split("=", 1)[1].strip()
    return None


def find_cudart_dir(nvcc):
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), nvcc_top(nvcc),
             "/usr/local/cuda"]
    for root in filter(None, roots):
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                    os.path.join("targets", "sbsa-linux", "lib")):
            d = os.path.join(root, sub)
            if os.path.exists(os.path.join(d, "libcudart_static.a")):
                return os.path.realpath(d)
    print(f"flowkern: libcudart_static.a not found under {[r for r in roots if r]}, building "
          "the CPU kernels only (set CUDA_HOME)", file=sys.stderr)
    return None


# no-math-errno / no-trapping-math: lets g++ vectorise sqrt and selects
# (csrc/include/flowkern/noise_block.h); flowkern reads neither errno nor
# floating-point exception flags. -fvisibility=hidden: nothing but the
# module's init function is exported (torch's stable headers are hidden too).
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fno-strict-aliasing", "-fno-math-errno",
             "-fno-trapping-math", "-fvisibility=hidden"]

# The oldest torch whose stable ABI flowkern._C needs (docs/build.md): 2.10,
# as TORCH_TARGET_VERSION's 0xMMmmpp...; the shim calls of a newer torch are
# compiled out, and the module loads into every torch from this one up.
TORCH_TARGET = (2, 10)
TORCH_TARGET_VERSION = "0x%02x%02x000000000000" % TORCH_TARGET
# CPython's limited API from 3.10: one abi3 module for every later CPython.
PY_LIMITED_API = "0x030A0000"


def build_torch_version():
    import torch
    return torch.__version__


def native_extension():
    """flowkern._C: the kernels, on torch's stable ABI and CPython's limited API."""
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    ext_kwargs = {}
    nvcc = find_nvcc()
    cudart_dir = find_cudart_dir(nvcc) if nvcc else None
    if cudart_dir is not None:
        sources += ["csrc/cuda/register.cpp"]
        ext_kwargs = dict(library_dirs=[cudart_dir],
                          libraries=["cudart_static", "rt", "dl", "pthread"])
    macros = [("TORCH_TARGET_VERSION", TORCH_TARGET_VERSION),
              ("FK_BUILD_TORCH_VERSION", '"%s"' % build_torch_version())]
    ext = CppExtension("flowkern._C", sources=sources, include_dirs=[INCLUDE],
                       define_macros=macros, py_limited_api=True,
                       extra_compile_args=CXX_FLAGS, extra_link_args=["-fopenmp"], **ext_kwargs)
    if cudart_dir is not None:
        ext.nvcc = nvcc
        ext.cu_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    return ext


def nograd_extension():
    """flowkern._nograd: the one piece the stable ABI cannot express (the
    Autograd-key kernel of the no-derivative ops, csrc/autograd), on torch's
    regular C++ API and bound to the torch it is built against; flowkern
    loads it only into that torch (flowkern/_native.py)."""
    return CppExtension("flowkern._nograd",
                        sources=rel(glob.glob(os.path.join(ROOT, "csrc", "autograd", "*.cpp"))),
                        py_limited_api=True, extra_compile_args=CXX_FLAGS)


def fastcall_extension():
    """flowkern._fastcall: the public functions' fast caller of the flowkern::
    ops (csrc/fastcall), on torch's C++ and Python API and CPython's full
    API: bound to the torch and the CPython it is built for, imported only
    there (flowkern/backend.py); elsewhere the ops' own binding serves."""
    return CppExtension("flowkern._fastcall",
                        sources=rel(glob.glob(os.path.join(ROOT, "csrc", "fastcall", "*.cpp"))),
                        define_macros=[("FK_BUILD_TORCH_VERSION", '"%s"' % build_torch_version())],
                        extra_compile_args=CXX_FLAGS)


setup(
    name="flowkern",
    version="0.1.0",
    description="Fused kernels for flow matching and diffusion models",
    packages=find_packages(include=["flowkern", "flowkern.*"]),
    # the op schemas (csrc/cpu/schemas.h compiles them in; Python reads them at import)
    package_data={"flowkern.ops": ["schemas.inc"]},
    ext_modules=[native_extension(), nograd_extension(), fastcall_extension()],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
    python_requires=">=3.10",
    # both modules use CPython's limited API only: one cp310-abi3 wheel
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    install_requires=["torch>=%d.%d" % TORCH_TARGET],
    extras_require={"triton": ["triton"], "progress": ["tqdm"],
                    # python -m flowkern demo: plots, exact W2, the digits section
                    "demo": ["matplotlib", "pot", "scikit-learn", "tqdm"]},
)
