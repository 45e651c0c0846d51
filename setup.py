"""Build torch_ext._C against the torch that is installed.

    pip install --no-build-isolation .          # CPU build (CUDA too when available)
    TORCH_EXT_CUDA=0|1|auto pip install ...       # force off / force on / detect (default)

CPU kernels are compiled once per instruction set (DEFAULT, AVX2, AVX512 on x86-64) as
small static libraries with their own flags, and chosen at run time by
at::get_cpu_capability(), the same switch ATen's own kernels use (it honours
ATEN_CPU_CAPABILITY). See csrc/cpu/capability/kernels_impl.h for why they are separate.
How CUDA is found and probed: torch_ext/_cuda_toolchain.py.
"""
import functools
import glob
import os
import platform
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup
from setuptools.command.build_clib import build_clib as _setuptools_build_clib

ROOT = os.path.dirname(os.path.abspath(__file__))


def _read_version():
    with open(os.path.join(ROOT, "torch_ext", "version.py")) as f:
        scope = {}
        exec(f.read(), scope)
        return scope["__version__"]


def _load_toolchain_module():
    """torch_ext/_cuda_toolchain.py, loaded by path: the package itself cannot be imported before
    its extension is built."""
    import importlib.util

    name = "torch_ext_cuda_toolchain"
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "torch_ext", "_cuda_toolchain.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


toolchain = _load_toolchain_module()

# Commands that compile: only these look for CUDA (and probe it). pip's metadata steps
# (egg_info, dist_info) run setup.py too and need no decision.
_BUILD_COMMANDS = {"build", "build_ext", "build_clib", "bdist_wheel", "install", "develop", "editable_wheel"}


def _plan_cuda():
    """TORCH_EXT_CUDA=auto|1|0 (default auto): see toolchain.plan. No GPU is needed at build time,
    so TORCH_CUDA_ARCH_LIST defaults to 8.0;9.0 (A100, H100/H200) rather than asking a device."""
    import torch

    arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return toolchain.plan(os.environ.get("TORCH_EXT_CUDA", "auto"), torch.__version__, torch.version.cuda, arch_list)


# -g0: Python's own CFLAGS (sysconfig) carry -g, which nearly doubles the compile time of
# every translation unit (regression_loss.cpp: 17 s against 9 s) and makes objects 30x larger.
CXX_FLAGS = ["-O3", "-fopenmp", "-g0"]
NVCC_FLAGS = ["-O3"]


def _cxx_std():
    import torch

    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 10) else "-std=c++17"


@functools.cache  # asked once per build, not per library
def _inline_flags():
    """GCC: no limit on how much inlining may grow a translation unit. Each capability library is
    one unit holding every kernel in every dtype; past GCC's default budget (40% growth of units
    over 10000 insns) it stops inlining where it runs out, which is the hot loops' vector math
    (ATen's exp_u20 called out of line slowed cross_entropy by about a third when the float16
    kernels joined the unit). Other compilers: nothing."""
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    try:
        version = subprocess.run(cxx.split() + ["--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    is_gcc = "Free Software Foundation" in version and "clang" not in version.lower()
    return ("--param=large-unit-insns=1000000",) if is_gcc else ()


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
                    "cflags": [_cxx_std(), "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"] + CXX_FLAGS + flags
                    + list(_inline_flags()),
                    "obj_deps": {"": sorted(glob.glob("csrc/**/*.h", recursive=True))},
                },
            )
        )
    return libs


def _extensions_and_libraries(cuda):
    from torch.utils import cpp_extension

    csrc = os.path.join(ROOT, "csrc")
    # csrc/*.cpp: the schemas (ops.cpp), the run-time config and device-neutral ops; csrc/cpu/*.cpp:
    # the CPU ops; csrc/cpu/runtime/*.cpp: their GEMM, output allocator and kernel table.
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    sources += sorted(glob.glob("csrc/cpu/runtime/*.cpp"))
    include_dirs = [csrc] + cpp_extension.include_paths()
    libraries = _capability_libraries(include_dirs)
    extra = {"cxx": list(CXX_FLAGS)}
    define_macros = [("TORCH_EXT_CPU_CAPABILITIES", str(len(libraries)))]
    kwargs = dict(include_dirs=[csrc], extra_link_args=["-fopenmp"])
    if cuda.build:
        tc = cuda.tc
        # torch's build helpers read their module's CUDA_HOME (nvcc, include/ and lib64/ come
        # from it); torch guesses it from the nvcc on PATH without following wrapper scripts.
        cpp_extension.CUDA_HOME = tc.home
        os.environ["CUDA_HOME"] = tc.home
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = list(NVCC_FLAGS)
        define_macros.append(("TORCH_EXT_WITH_CUDA", None))
        kwargs["include_dirs"] += tc.include_dirs  # after the toolkit's own: they only fill gaps
        # -lcudart (which CUDAExtension always adds) resolves to the runtime torch loads;
        # cuBLASLt is linked by path, so the module records its soname and, at import, uses
        # the copy torch has already loaded.
        kwargs["library_dirs"] = [toolchain.link_dir(tc, os.path.join(ROOT, "build", "cuda_link"))]
        kwargs["extra_link_args"].append(tc.cublaslt)
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        "torch_ext._C",
        sources,
        define_macros=define_macros,
        extra_compile_args=extra,
        # The capability libraries are named here too so that their order on the link line
        # is fixed (see _capability_libraries).
        libraries=[name for name, _ in libraries],
        **kwargs,
    )
    return [ext], libraries


def _build_config(cuda):
    """What this build was: written next to the compiled module as torch_ext/_build_config.py,
    read by torch_ext.show_config()."""
    import torch

    tc = cuda.tc
    return {
        "version": _read_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_mode": cuda.mode,
        "cuda": cuda.build,
        "cuda_why_not": cuda.why_not,
        "cuda_home": tc.home if tc else None,
        "cuda_home_from": tc.home_from if tc else None,
        "cuda_version": tc.version if tc else None,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if cuda.build else None,
        "cudart": tc.cudart if cuda.build else None,
        "cublaslt": tc.cublaslt if cuda.build else None,
        "cpu_capabilities": [name.rsplit("_", 1)[-1].upper() for name, _ in libraries],
        "cxx_flags": [_cxx_std()] + CXX_FLAGS,
        "cpu_kernel_flags": list(_inline_flags()),  # added for the capability libraries
        "nvcc_flags": NVCC_FLAGS if cuda.build else None,
    }


def _build_ext_cls():
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class build_ext(base):
        """Builds the capability libraries first (setuptools' build_ext does not, so an in-place
        or editable build would not link), then writes _build_config.py beside the module."""

        def run(self):
            self.run_command("build_clib")
            super().run()
            folder = os.path.dirname(self.get_ext_fullpath("torch_ext._C"))
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "_build_config.py"), "w") as f:
                f.write('"""Written by setup.py when torch_ext._C was built; see torch_ext.show_config()."""\n')
                f.write(f"BUILD_CONFIG = {_build_config(cuda_plan)!r}\n")

    return build_ext


class build_clib(_setuptools_build_clib):
    """The capability libraries compile in parallel, one per core (setuptools compiles them one
    after another; each is one large translation unit), through ccache or sccache when installed,
    as torch's build already does for the extension's own files."""

    def build_libraries(self, libraries):
        from concurrent.futures import ThreadPoolExecutor

        from torch.utils import cpp_extension

        wrap = getattr(cpp_extension, "_wrap_compiler", None)  # honours TORCH_NO_COMPILER_WRAPPER
        for attr in ("compiler_so", "compiler_so_cxx") if wrap else ():
            command = getattr(self.compiler, attr, None)
            if command and command[0] not in ("ccache", "sccache"):
                setattr(self.compiler, attr, wrap(command))
        workers = max(1, min(len(libraries), os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            for done in [pool.submit(super(build_clib, self).build_libraries, [lib]) for lib in libraries]:
                done.result()


_building = bool(_BUILD_COMMANDS.intersection(sys.argv[1:]))
cuda_plan = _plan_cuda() if _building else toolchain.CudaPlan("auto", why_not="not building")
ext_modules, libraries = _extensions_and_libraries(cuda_plan)

setup(
    name="torch_ext",
    version=_read_version(),
    description="Fused dense+activation and loss operators for PyTorch (CPU and CUDA)",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["torch_ext", "torch_ext.*"]),
    package_data={"torch_ext": ["py.typed"]},  # PEP 561: the package's annotations are for type checkers
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    # The tests include a smoke run of the benchmark suite, which checks its table and chart:
    # so the test extras carry the benchmark's packages too; transformers for the tests of
    # fuse() on Hugging Face models.
    extras_require={
        "test": ["pytest", "pytest-xdist", "numpy", "tabulate", "matplotlib", "tqdm", "transformers", "expecttest"],
        "bench": ["tabulate", "matplotlib", "tqdm"],
    },
    ext_modules=ext_modules,
    libraries=libraries,
    cmdclass={"build_ext": _build_ext_cls(), "build_clib": build_clib},
    zip_safe=False,
)
