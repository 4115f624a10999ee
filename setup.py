"""Builds flowkern's two native modules.

flowkern._C     CPU kernels + TORCH_LIBRARY schemas (g++, OpenMP, -O3).
flowkern._cuda  CUDA kernels compiled by nvcc for sm_80, sm_90 and compute_90
                PTX, bound with pybind11, cudart linked statically. Its .cu
                files include no torch header (the CPU torch wheel cannot build
                a CUDAExtension), so launchers take raw pointers and the stream
                as integers. Skipped with a message when nvcc is missing, or on
                purpose with FLOWKERN_SKIP_CUDA=1.
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
        print("flowkern: FLOWKERN_SKIP_CUDA=1, not building flowkern._cuda", file=sys.stderr)
        return None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
            cand = os.path.join(home, "bin", "nvcc") if home else None
            if cand and os.path.exists(cand):
                nvcc = cand
                break
    if nvcc is None:
        print("flowkern: nvcc not found, not building flowkern._cuda "
              "(the cuda backend will be unavailable; triton and cpu are unaffected)",
              file=sys.stderr)
    return nvcc


class Build(BuildExtension):
    """BuildExtension that first compiles flowkern._cuda's .cu files with nvcc."""

    def build_extension(self, ext):
        if ext.name == "flowkern._cuda":
            self._compile_cuda_objects(ext)
        super().build_extension(ext)

    def _compile_cuda_objects(self, ext):
        nvcc = ext.nvcc
        out_dir = os.path.join(self.build_temp, "cuda_objects")
        os.makedirs(out_dir, exist_ok=True)
        objects = []
        for src in ext.cu_sources:
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-I", INCLUDE,
                   "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", *CUDA_ARCH_FLAGS]
            print(" ".join(cmd))
            subprocess.check_call(cmd, cwd=ROOT)
            objects.append(obj)
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
    print(f"flowkern: libcudart_static.a not found under {[r for r in roots if r]}, not "
          "building flowkern._cuda (set CUDA_HOME)", file=sys.stderr)
    return None


def cuda_extension():
    nvcc = find_nvcc()
    if nvcc is None:
        return []
    cudart_dir = find_cudart_dir(nvcc)
    if cudart_dir is None:
        return []
    import pybind11

    ext = Extension(
        "flowkern._cuda",
        sources=rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))),
        include_dirs=[INCLUDE, os.path.join(ROOT, "csrc", "cuda"), pybind11.get_include()],
        library_dirs=[cudart_dir],
        libraries=["cudart_static", "rt", "dl", "pthread"],
        extra_compile_args=["-O3", "-std=c++17"],
        language="c++",
    )
    ext.nvcc = nvcc
    ext.cu_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    return [ext]


cpu_extension = CppExtension(
    "flowkern._C",
    sources=rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))),
    include_dirs=[INCLUDE],
    # no-math-errno / no-trapping-math: lets g++ vectorise sqrt and selects
    # (csrc/include/flowkern/noise_block.h); flowkern reads neither errno nor
    # floating-point exception flags.
    extra_compile_args=["-O3", "-std=c++20", "-fopenmp", "-fno-strict-aliasing",
                        "-fno-math-errno", "-fno-trapping-math"],
    extra_link_args=["-fopenmp"],
)

setup(
    name="flowkern",
    version="0.1.0",
    description="Fused kernels for flow matching and diffusion models",
    packages=find_packages(include=["flowkern", "flowkern.*"]),
    ext_modules=[cpu_extension, *cuda_extension()],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton"], "progress": ["tqdm"]},
)
