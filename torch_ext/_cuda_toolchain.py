"""Find the CUDA pieces a CUDA build of torch_ext needs, the way torch itself finds them, and
probe them in seconds before compiling anything.

setup.py loads this file by path (the package cannot be imported before it is built), and
``torch_ext.show_config()`` and the tests import it as ``torch_ext._cuda_toolchain``. It imports
nothing but the standard library, and every function takes what it looks at (environment,
PATH lookup, the pip ``nvidia`` folders) as arguments, so the tests can run it over fake layouts.

The toolkit (nvcc, the CUDA headers) is resolved in this order:
1. ``CUDA_HOME``, then ``CUDA_PATH``, as torch does;
2. the ``nvcc`` on PATH: followed through symlinks, and when that does not end in a toolkit's
   ``bin/`` (a wrapper script such as ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``), nvcc itself
   is asked where it lives (``nvcc --dryrun`` prints its own folder);
3. the usual install folders (``/usr/local/cuda``, the newest ``/usr/local/cuda-*``, ``/opt/cuda``).

The CUDA runtime and cuBLASLt are the copies torch loads at run time: those of the pip
``nvidia-*`` wheels torch depends on when they are there, else the toolkit's. Headers a system
toolkit lacks (cusparse.h, cublasLt.h, ...) are taken from the same wheels, after the toolkit's.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, List, Mapping, Optional, Sequence

USUAL_HOMES = ("/usr/local/cuda", "/usr/local/cuda-*", "/opt/cuda")
TOOLKIT_LIB_DIRS = ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
# What ATen's CUDA headers (ATen/cuda/CUDAContextLight.h) and our kernels include: the probe
# includes each, so a toolkit without them fails the probe, not the build minutes later.
PROBE_HEADERS = ("cuda_runtime.h", "cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h")
PROBE_SOURCE = "".join(f"#include <{h}>\n" for h in PROBE_HEADERS) + r"""
__global__ void torch_ext_probe_kernel(float* x) { x[threadIdx.x] += 1.0f; }
extern "C" int torch_ext_probe(void) {
    int n = 0;
    cublasLtHandle_t handle = nullptr;
    if (cudaGetDeviceCount(&n) != cudaSuccess) return -1;
    if (cublasLtCreate(&handle) != CUBLAS_STATUS_SUCCESS) return -2;
    cublasLtDestroy(handle);
    return n;
}
"""


@dataclass
class CudaToolchain:
    """What was found. ``problems`` is empty when a CUDA build can be tried; otherwise each entry
    names a missing piece (the message a failed ``auto`` build warns with and ``TORCH_EXT_CUDA=1``
    fails with)."""

    home: Optional[str] = None          # the toolkit's root folder
    home_from: str = ""                 # how it was found
    nvcc: Optional[str] = None
    version: Optional[str] = None       # the toolkit's CUDA version, "13.0"
    torch_cuda: Optional[str] = None    # torch.version.cuda
    cudart: Optional[str] = None        # the libcudart.so* linked
    cublaslt: Optional[str] = None      # the libcublasLt.so* linked
    include_dirs: List[str] = field(default_factory=list)  # wheel headers, after the toolkit's
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        if self.home is None:
            return "no CUDA toolkit found"
        return f"CUDA {self.version} at {self.home} ({self.home_from})"


def _run(cmd: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, check=False)


def _is_toolkit(home: str) -> bool:
    """nvcc beside the CUDA runtime's headers: a folder that only holds an nvcc wrapper script
    (/usr/local/bin/nvcc) is not a toolkit."""
    return (os.path.isfile(os.path.join(home, "bin", "nvcc"))
            and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")))


def _nvcc_says_home(nvcc: str) -> Optional[str]:
    """The toolkit folder nvcc reports for itself: ``nvcc --dryrun`` of a compile prints
    ``#$ _HERE_=<toolkit>/bin`` (and ``#$ TOP=<toolkit>``) without running anything."""
    try:
        out = _run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for key in ("TOP", "_HERE_"):
        m = re.search(rf"^#\$ {key}=(.+)$", out, re.MULTILINE)
        if m:
            path = os.path.normpath(m.group(1).strip())
            home = path if key == "TOP" else os.path.dirname(path)
            if os.path.basename(home) == "bin":
                home = os.path.dirname(home)
            if _is_toolkit(home):
                return home
    return None


def find_toolkit(env: Mapping[str, str], which: Callable[[str], Optional[str]] = shutil.which,
                 usual_homes: Sequence[str] = USUAL_HOMES):
    """(home, how it was found, problem): the CUDA toolkit's folder, or None and why not."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = env.get(var)
        if home:
            if _is_toolkit(home):
                return os.path.normpath(home), var, None
            return None, var, f"{var}={home} is not a CUDA toolkit (no bin/nvcc and include/cuda_runtime.h there)"
    nvcc = which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if os.path.basename(os.path.dirname(real)) == "bin" and _is_toolkit(home):
            how = f"nvcc on PATH ({nvcc})" if real == nvcc else f"nvcc on PATH ({nvcc} -> {real})"
            return home, how, None
        home = _nvcc_says_home(nvcc)
        if home:
            return home, f"nvcc on PATH ({nvcc}, a wrapper of {os.path.join(home, 'bin', 'nvcc')})", None
    for pattern in usual_homes:
        for home in sorted(glob.glob(pattern), key=_version_key, reverse=True):
            if _is_toolkit(home):
                return os.path.normpath(home), "usual install folder", None
    where = f"the nvcc on PATH ({nvcc}) does not say where its toolkit is; " if nvcc else "no nvcc on PATH, "
    return None, "", (f"no CUDA toolkit: {where}CUDA_HOME is not set, and none of {', '.join(usual_homes)} "
                      "holds a toolkit (bin/nvcc, include/cuda_runtime.h); set CUDA_HOME")


def _version_key(path: str):
    return tuple(int(v) for v in re.findall(r"\d+", os.path.basename(path)))


def nvcc_version(nvcc: str) -> Optional[str]:
    """"13.0" from ``nvcc --version`` ("Cuda compilation tools, release 13.0, V13.0.88")."""
    try:
        out = _run([nvcc, "--version"], timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def pip_cuda_dirs(kind: str, nvidia_paths: Sequence[str]) -> List[str]:
    """The ``include`` or ``lib`` folders of the pip ``nvidia-*`` wheels (CUDA 13:
    nvidia/cu13/<kind>; CUDA 12: nvidia/<library>/<kind>)."""
    dirs = []
    for root in nvidia_paths:
        dirs += glob.glob(os.path.join(root, "cu*", kind)) + glob.glob(os.path.join(root, "*", kind))
    return sorted({d for d in dirs if os.path.isdir(d)})


def default_nvidia_paths() -> List[str]:
    """Where the pip ``nvidia`` namespace package lives (none when it is not installed)."""
    try:
        import nvidia
    except ImportError:
        return []
    return list(getattr(nvidia, "__path__", []))


def find_library(name: str, major: Optional[str], home: Optional[str], nvidia_paths: Sequence[str]) -> Optional[str]:
    """The shared library ``lib<name>.so*`` to link: the pip wheels' copy (what torch loads) first,
    then the toolkit's. With ``major`` set, only a copy of that major version (or an unversioned
    one, in the toolkit) qualifies."""
    folders = pip_cuda_dirs("lib", nvidia_paths)
    if home:
        folders += [os.path.join(home, sub) for sub in TOOLKIT_LIB_DIRS]
    for folder in folders:
        found = []
        for path in glob.glob(os.path.join(folder, f"lib{name}.so*")):
            suffix = os.path.basename(path)[len(f"lib{name}.so"):]
            if major is None or suffix == "" or suffix == f".{major}" or suffix.startswith(f".{major}."):
                found.append(path)
        if found:
            return sorted(found, key=len)[0]
    return None


def resolve(torch_cuda: Optional[str], env: Optional[Mapping[str, str]] = None,
            which: Callable[[str], Optional[str]] = shutil.which,
            nvidia_paths: Optional[Sequence[str]] = None,
            usual_homes: Sequence[str] = USUAL_HOMES) -> CudaToolchain:
    """Everything a CUDA build needs, found without compiling; ``problems`` says what is missing."""
    env = os.environ if env is None else env
    nvidia_paths = default_nvidia_paths() if nvidia_paths is None else nvidia_paths
    tc = CudaToolchain(torch_cuda=torch_cuda)
    if not torch_cuda:
        tc.problems.append("the installed torch has no CUDA (torch.version.cuda is None)")
        return tc
    tc.home, tc.home_from, problem = find_toolkit(env, which, usual_homes)
    if problem:
        tc.problems.append(problem)
        return tc
    tc.nvcc = os.path.join(tc.home, "bin", "nvcc")
    tc.version = nvcc_version(tc.nvcc)
    major = torch_cuda.split(".")[0]
    if tc.version is None:
        tc.problems.append(f"{tc.nvcc} --version does not say its CUDA release")
    elif tc.version.split(".")[0] != major:
        tc.problems.append(f"the CUDA toolkit at {tc.home} is CUDA {tc.version}, torch was built with CUDA "
                           f"{torch_cuda}: their major versions must match (install CUDA {major}.x and set CUDA_HOME "
                           "to it)")
    tc.cudart = find_library("cudart", major, tc.home, nvidia_paths)
    tc.cublaslt = find_library("cublasLt", major, tc.home, nvidia_paths)
    for lib, what in ((tc.cudart, "cudart"), (tc.cublaslt, "cublasLt")):
        if lib is None:
            tc.problems.append(
                f"no lib{what}.so (CUDA {major}) in the pip nvidia-* packages nor in {tc.home}'s lib folders"
            )
    tc.include_dirs = pip_cuda_dirs("include", nvidia_paths)
    return tc


def link_dir(tc: CudaToolchain, folder: str) -> str:
    """A folder holding ``libcudart.so`` -> the runtime chosen above, to put first on the library
    path: torch's CUDAExtension always links ``-lcudart``, and the wheels ship only the versioned
    file (libcudart.so.13), which ``-lcudart`` would not find."""
    os.makedirs(folder, exist_ok=True)
    link = os.path.join(folder, "libcudart.so")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(tc.cudart, link)
    return folder


def first_arch(arch_list: str) -> str:
    """"90" from TORCH_CUDA_ARCH_LIST "8.0;9.0" style lists (the probe builds for one arch)."""
    first = re.split(r"[;\s,]+", arch_list.strip())[0]
    return first.replace("+PTX", "").replace(".", "")


def probe(tc: CudaToolchain, arch_list: str, timeout: float = 120.0) -> Optional[str]:
    """Compile and link one tiny .cu the way the build will (same nvcc, headers, runtime and
    cuBLASLt): None when it works, else what failed, with the compiler's last lines."""
    if not tc.ok:
        return "; ".join(tc.problems)
    with tempfile.TemporaryDirectory(prefix="torch_ext_cuda_probe_") as tmp:
        src = os.path.join(tmp, "probe.cu")
        with open(src, "w") as f:
            f.write(PROBE_SOURCE)
        arch = first_arch(arch_list)
        cmd = [tc.nvcc, "-shared", "-Xcompiler", "-fPIC", f"-gencode=arch=compute_{arch},code=sm_{arch}",
               "-I", os.path.join(tc.home, "include")]
        for d in tc.include_dirs:
            cmd += ["-I", d]
        cmd += [src, "-o", os.path.join(tmp, "probe.so"), "-L", link_dir(tc, os.path.join(tmp, "lib")), "-lcudart",
                "-Xlinker", tc.cublaslt]
        try:
            res = _run(cmd, timeout=timeout)
        except (OSError, subprocess.SubprocessError) as e:
            return f"the CUDA probe could not run {tc.nvcc}: {e}"
        if res.returncode != 0:
            tail = "\n".join(res.stdout.strip().splitlines()[-6:])
            return f"the CUDA probe (compile and link a tiny .cu with {tc.nvcc}) failed:\n{tail}"
    return None


class CudaPlan:
    """Whether a build compiles the CUDA kernels (``build``) with toolchain ``tc``, and if not,
    why not (``why_not``)."""

    def __init__(self, mode: str, tc: Optional[CudaToolchain] = None, why_not: Optional[str] = None):
        self.mode, self.tc, self.why_not = mode, tc, why_not

    @property
    def build(self) -> bool:
        return self.why_not is None


def plan(mode: str, torch_version: str, torch_cuda: Optional[str], arch_list: str, **resolve_kwargs) -> CudaPlan:
    """setup.py's decision for TORCH_EXT_CUDA=``mode``: 'auto' builds the CUDA kernels when torch
    has CUDA and the probe compiles and links a tiny .cu, and otherwise builds CPU-only after one
    warning that names the missing piece; '1' raises SystemExit with that same message instead;
    '0' never looks for CUDA."""
    mode = mode.strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"torch_ext: TORCH_EXT_CUDA must be 'auto', '0' or '1', got {mode!r}")
    if mode == "0":
        return CudaPlan(mode, why_not="TORCH_EXT_CUDA=0")
    if torch_cuda is None:
        why = f"the installed torch {torch_version} has no CUDA (torch.version.cuda is None)"
        if mode == "1":
            raise SystemExit(f"torch_ext: TORCH_EXT_CUDA=1 but {why}")
        return CudaPlan(mode, why_not=why)
    tc = resolve(torch_cuda, **resolve_kwargs)
    problem = probe(tc, arch_list)
    if problem is None:
        print(f"torch_ext: building the CUDA kernels: {tc.describe()}, archs {arch_list}, "
              f"cudart {tc.cudart}, cuBLASLt {tc.cublaslt}", flush=True)
        return CudaPlan(mode, tc)
    if mode == "1":
        raise SystemExit(f"torch_ext: TORCH_EXT_CUDA=1 but the CUDA build cannot work here: {problem}")
    bar = "=" * 78
    # stderr: pip shows a build's output only with -v; `python -m torch_ext` and the import-time
    # warning on a machine with a GPU repeat this reason from the recorded build config.
    print(f"\n{bar}\nWARNING torch_ext: building WITHOUT the CUDA kernels (CPU only): {problem}\n"
          f"Fix that (e.g. set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]}.x toolkit) and reinstall, or set "
          f"TORCH_EXT_CUDA=1 to make this an error, TORCH_EXT_CUDA=0 to silence it.\n{bar}\n",
          file=sys.stderr, flush=True)
    return CudaPlan(mode, tc, why_not=problem)
