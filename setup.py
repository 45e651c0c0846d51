"""Build torch_ext._C against the torch that is installed.

    pip install --no-build-isolation .          # CPU build (CUDA too when available)
    TORCH_EXT_CUDA=0|1|auto pip install ...       # force off / force on / detect (default)

CPU kernels are compiled once per instruction set (DEFAULT, AVX2, AVX512 on x86-64) as
small static libraries with their own flags, and chosen at run time by
at::get_cpu_capability(), the same switch ATen's own kernels use (it honours
ATEN_CPU_CAPABILITY). See csrc/cpu/capability/README.md for why they are separate.
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _read_version():
    with open(os.path.join(ROOT, "torch_ext", "version.py")) as f:
        scope = {}
        exec(f.read(), scope)
        return scope["__version__"]


def _cuda_requested():
    """TORCH_EXT_CUDA: 'auto' (default) builds CUDA only when torch has CUDA and nvcc is found."""
    mode = os.environ.get("TORCH_EXT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"TORCH_EXT_CUDA must be 'auto', '0' or '1', got {mode!r}")
    if mode == "0":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    has_torch_cuda = torch.version.cuda is not None
    has_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    has_cublaslt = has_torch_cuda and _cublaslt_library() is not None
    if mode == "1":
        if not has_torch_cuda:
            sys.exit("TORCH_EXT_CUDA=1 but the installed torch has no CUDA (torch.version.cuda is None)")
        if not has_nvcc:
            sys.exit("TORCH_EXT_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME to a folder with bin/nvcc)")
        if not has_cublaslt:
            sys.exit("TORCH_EXT_CUDA=1 but no libcublasLt.so* was found in the pip nvidia-* packages or "
                     "in CUDA_HOME's lib folders")
        return True
    if has_torch_cuda and has_nvcc and not has_cublaslt:
        print("torch_ext: building without CUDA: no libcublasLt.so* found (set TORCH_EXT_CUDA=1 to make this an error)")
    return has_torch_cuda and has_nvcc and has_cublaslt


def _pip_cuda_dirs(kind):
    """The `include` or `lib` folders of the pip `nvidia-*` packages that torch depends on (CUDA
    13: nvidia/cu13/<kind>; CUDA 12: nvidia/<library>/<kind>)."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for root in getattr(nvidia, "__path__", []):
        dirs += glob.glob(os.path.join(root, "cu*", kind)) + glob.glob(os.path.join(root, "*", kind))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _pip_cuda_include_dirs():
    """A system toolkit may lack some of the headers ATen's CUDA headers include (e.g.
    cusparse.h, cublasLt.h); the wheels torch depends on have them. They come after the
    toolkit's own headers (CUDA_HOME/include is first), so they only fill gaps."""
    return _pip_cuda_dirs("include")


def _cublaslt_library():
    """The libcublasLt the CUDA kernels link against (csrc/cuda/cublaslt_gemm.cu): the one of the
    pip wheel torch loads, else the toolkit's; None when neither exists. Linked by path, so the
    module records its soname (libcublasLt.so.<major>) and, at import, uses the copy torch has
    already loaded."""
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [os.path.join(d, "libcublasLt.so*") for d in _pip_cuda_dirs("lib")]
    if CUDA_HOME:
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            candidates.append(os.path.join(CUDA_HOME, sub, "libcublasLt.so*"))
    for pattern in candidates:
        found = sorted(glob.glob(pattern), key=len)
        if found:
            return found[0]
    return None


def _cxx_std():
    import torch

    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 10) else "-std=c++17"


def _capability_libraries(include_dirs):
    """One static library per CPU instruction set, each built with its own -m flags (and
    -fopenmp: at::parallel_for is inline, and without it the kernels' loops run on one thread).

    Order matters: the linker keeps the first copy of an inline function that several objects
    define, so the plain objects and the DEFAULT build come before AVX2 and AVX512.
    """
    import torch

    variants = [("DEFAULT", [])]
    if platform.machine().lower() in ("x86_64", "amd64") and sys.platform.startswith("linux"):
        variants += [
            ("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
            ("AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]),
        ]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libs = []
    for name, flags in variants:
        macros = [("CPU_CAPABILITY", name), (f"CPU_CAPABILITY_{name}", None)]
        libs.append(
            (
                f"torch_ext_cpu_{name.lower()}",
                {
                    "sources": [f"csrc/cpu/capability/{name.lower()}.cpp"],
                    "include_dirs": include_dirs,
                    "macros": macros,
                    "cflags": [_cxx_std(), "-O3", "-fopenmp", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"] + flags,
                    "obj_deps": {"": sorted(glob.glob("csrc/**/*.h", recursive=True))},
                },
            )
        )
    return libs


def _extensions_and_libraries():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension, include_paths

    csrc = os.path.join(ROOT, "csrc")
    # csrc/*.cpp: the schemas (ops.cpp) and device-neutral ops; csrc/cpu/*.cpp: the CPU ops.
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [csrc] + include_paths()
    libraries = _capability_libraries(include_dirs)
    extra = {"cxx": ["-O3", "-fopenmp"], "nvcc": ["-O3"]}
    define_macros = [("TORCH_EXT_CPU_CAPABILITIES", str(len(libraries)))]
    cuda_include_dirs = []
    link_args = ["-fopenmp"]
    if _cuda_requested():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        cuda_include_dirs = _pip_cuda_include_dirs()
        link_args.append(_cublaslt_library())
        ext_cls = CUDAExtension
        define_macros.append(("TORCH_EXT_WITH_CUDA", None))
    else:
        ext_cls = CppExtension
        extra.pop("nvcc")
    ext = ext_cls(
        "torch_ext._C",
        sources,
        include_dirs=[csrc] + cuda_include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=link_args,
        # The capability libraries are named here too so that their order on the link line
        # is fixed (see _capability_libraries).
        libraries=[name for name, _ in libraries],
    )
    return [ext], libraries


def _build_ext_cls():
    from torch.utils.cpp_extension import BuildExtension

    use_ninja = shutil.which("ninja") is not None
    return BuildExtension.with_options(use_ninja=use_ninja)


ext_modules, libraries = _extensions_and_libraries()

setup(
    name="torch_ext",
    version=_read_version(),
    description="Fused dense+activation and loss operators for PyTorch (CPU and CUDA)",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["torch_ext", "torch_ext.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    # The tests include a smoke run of the benchmark suite, which checks its table and chart:
    # so the test extras carry the benchmark's packages too.
    extras_require={
        "test": ["pytest", "numpy", "tabulate", "matplotlib", "tqdm"],
        "bench": ["tabulate", "matplotlib", "tqdm"],
    },
    ext_modules=ext_modules,
    libraries=libraries,
    cmdclass={"build_ext": _build_ext_cls()},
    zip_safe=False,
)
