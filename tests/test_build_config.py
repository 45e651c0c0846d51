"""How the build finds CUDA (torch_ext/_cuda_toolchain.py), and what ``python -m torch_ext`` says.

The resolver runs over fake folder layouts built in tmp_path: a toolkit whose nvcc is reached
through a symlink, through a wrapper script (nvcc itself is asked where it lives), a runtime only
in the pip ``nvidia`` wheels, a toolkit without cuBLASLt, a CUDA major version that differs
from torch's. The fake nvcc is a shell script that answers ``--version`` and ``--dryrun`` as the
real one does.
"""
import os
import stat
import subprocess
import sys

import pytest
import torch

import torch_ext
from torch_ext import _cuda_toolchain as tc_mod
from utils import run_python

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fake toolkits are shell scripts and .so names")


def _write(path, text="", mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    if mode:
        os.chmod(path, mode)
    return str(path)


def _fake_toolkit(root, version="13.0", libs=("cudart", "cublasLt"), lib_dir="lib64"):
    """A toolkit folder: bin/nvcc (answering --version and --dryrun), include/cuda_runtime.h, and
    lib<name>.so.<major> for each of `libs`."""
    root = str(root)
    major = version.split(".")[0]
    script = f"""#!/bin/sh
for a in "$@"; do
  if [ "$a" = "--dryrun" ]; then echo '#$ _HERE_={root}/bin'; echo '#$ TOP={root}/bin/..'; exit 0; fi
done
echo 'nvcc: NVIDIA (R) Cuda compiler driver'
echo 'Cuda compilation tools, release {version}, V{version}.88'
"""
    _write(os.path.join(root, "bin", "nvcc"), script, stat.S_IRWXU)
    _write(os.path.join(root, "include", "cuda_runtime.h"))
    for lib in libs:
        _write(os.path.join(root, lib_dir, f"lib{lib}.so.{major}"))
    return root


def _fake_wheels(root, major="13", libs=("cudart", "cublasLt")):
    """The pip `nvidia` namespace folder of CUDA 13 wheels: nvidia/cu13/{lib,include}."""
    nvidia = os.path.join(str(root), "nvidia")
    for lib in libs:
        _write(os.path.join(nvidia, f"cu{major}", "lib", f"lib{lib}.so.{major}"))
    _write(os.path.join(nvidia, f"cu{major}", "include", "cublasLt.h"))
    return nvidia


def _no_nvcc(_name):
    return None


def test_cuda_home_env_wins(tmp_path):
    home = _fake_toolkit(tmp_path / "cuda")
    tc = tc_mod.resolve("13.0", env={"CUDA_HOME": home}, which=_no_nvcc, nvidia_paths=[], usual_homes=())
    assert tc.ok, tc.problems
    assert (tc.home, tc.home_from, tc.version) == (home, "CUDA_HOME", "13.0")
    assert tc.cudart == os.path.join(home, "lib64", "libcudart.so.13")
    assert tc.cublaslt == os.path.join(home, "lib64", "libcublasLt.so.13")


def test_cuda_path_when_no_cuda_home(tmp_path):
    home = _fake_toolkit(tmp_path / "cuda")
    tc = tc_mod.resolve("13.0", env={"CUDA_PATH": home}, which=_no_nvcc, nvidia_paths=[], usual_homes=())
    assert tc.ok and tc.home == home and tc.home_from == "CUDA_PATH"


def test_cuda_home_that_is_not_a_toolkit_is_named(tmp_path):
    tc = tc_mod.resolve("13.0", env={"CUDA_HOME": str(tmp_path)}, which=_no_nvcc, nvidia_paths=[], usual_homes=())
    assert not tc.ok
    assert f"CUDA_HOME={tmp_path} is not a CUDA toolkit" in tc.problems[0]


def test_symlinked_nvcc_is_followed(tmp_path):
    home = _fake_toolkit(tmp_path / "opt" / "cuda-13.0")
    link = tmp_path / "usr" / "bin" / "nvcc"
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.join(home, "bin", "nvcc"))
    tc = tc_mod.resolve("13.0", env={}, which=lambda name: str(link), nvidia_paths=[], usual_homes=())
    assert tc.ok, tc.problems
    assert tc.home == home
    assert tc.home_from == f"nvcc on PATH ({link} -> {home}/bin/nvcc)"


def test_wrapper_script_nvcc_is_asked_where_it_lives(tmp_path):
    # /usr/local/bin/nvcc as on the project's machines: `exec <toolkit>/bin/nvcc "$@"`. Its own
    # parent (tmp/usr/local) must not be taken for the toolkit, though it has bin/nvcc.
    home = _fake_toolkit(tmp_path / "cuda-13.0")
    wrapper = _write(tmp_path / "usr" / "local" / "bin" / "nvcc", f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n',
                     stat.S_IRWXU)
    os.makedirs(tmp_path / "usr" / "local" / "include")
    tc = tc_mod.resolve("13.0", env={}, which=lambda name: wrapper, nvidia_paths=[], usual_homes=())
    assert tc.ok, tc.problems
    assert tc.home == home and tc.version == "13.0"
    assert "a wrapper of" in tc.home_from


def test_usual_folders_pick_the_newest(tmp_path):
    _fake_toolkit(tmp_path / "cuda-12.8", version="12.8")
    newest = _fake_toolkit(tmp_path / "cuda-13.0")
    tc = tc_mod.resolve("13.0", env={}, which=_no_nvcc, nvidia_paths=[], usual_homes=(str(tmp_path / "cuda-*"),))
    assert tc.ok and tc.home == newest and tc.home_from == "usual install folder"


def test_no_toolkit_anywhere(tmp_path):
    tc = tc_mod.resolve("13.0", env={}, which=_no_nvcc, nvidia_paths=[], usual_homes=(str(tmp_path / "none"),))
    assert not tc.ok and tc.home is None
    assert tc.problems[0].startswith("no CUDA toolkit: no nvcc on PATH")
    assert tc_mod.probe(tc, "9.0") == "; ".join(tc.problems)  # the probe runs nothing then


def test_runtime_and_cublaslt_only_in_the_pip_wheels(tmp_path):
    # A toolkit with nvcc and headers but no libraries (a pip-installed nvcc, or a partial
    # install): the runtime and cuBLASLt torch loads come from the nvidia wheels.
    home = _fake_toolkit(tmp_path / "cuda", libs=())
    nvidia = _fake_wheels(tmp_path / "site-packages")
    tc = tc_mod.resolve("13.0", env={"CUDA_HOME": home}, which=_no_nvcc, nvidia_paths=[nvidia], usual_homes=())
    assert tc.ok, tc.problems
    assert tc.cudart == os.path.join(nvidia, "cu13", "lib", "libcudart.so.13")
    assert tc.cublaslt == os.path.join(nvidia, "cu13", "lib", "libcublasLt.so.13")
    assert tc.include_dirs == [os.path.join(nvidia, "cu13", "include")]


def test_pip_wheels_come_before_the_toolkit(tmp_path):
    home = _fake_toolkit(tmp_path / "cuda")
    nvidia = _fake_wheels(tmp_path / "site-packages")
    tc = tc_mod.resolve("13.0", env={"CUDA_HOME": home}, which=_no_nvcc, nvidia_paths=[nvidia], usual_homes=())
    assert tc.cudart.startswith(nvidia) and tc.cublaslt.startswith(nvidia)


def test_toolkit_without_cublaslt(tmp_path):
    home = _fake_toolkit(tmp_path / "cuda", libs=("cudart",))
    tc = tc_mod.resolve("13.0", env={"CUDA_HOME": home}, which=_no_nvcc, nvidia_paths=[], usual_homes=())
    assert not tc.ok
    assert tc.cudart is not None and tc.cublaslt is None
    assert tc.problems == [f"no libcublasLt.so (CUDA 13) in the pip nvidia-* packages nor in {home}'s lib folders"]
    assert "libcublasLt" in tc_mod.probe(tc, "9.0")


def test_library_of_another_major_does_not_count(tmp_path):
    home = _fake_toolkit(tmp_path / "cuda")
    nvidia = _fake_wheels(tmp_path / "site-packages", major="12")
    _write(os.path.join(home, "lib64", "libcublasLt.so.12"))
    os.remove(os.path.join(home, "lib64", "libcublasLt.so.13"))
    tc = tc_mod.resolve("13.0", env={"CUDA_HOME": home}, which=_no_nvcc, nvidia_paths=[nvidia], usual_homes=())
    assert tc.cudart == os.path.join(home, "lib64", "libcudart.so.13")
    assert tc.cublaslt is None and not tc.ok


def test_toolkit_version_must_match_torch(tmp_path):
    home = _fake_toolkit(tmp_path / "cuda", version="12.8")
    tc = tc_mod.resolve("13.0", env={"CUDA_HOME": home}, which=_no_nvcc, nvidia_paths=[], usual_homes=())
    assert not tc.ok and tc.version == "12.8"
    assert "is CUDA 12.8, torch was built with CUDA 13.0: their major versions must match" in tc.problems[0]


def test_minor_versions_may_differ(tmp_path):
    home = _fake_toolkit(tmp_path / "cuda", version="13.1")
    tc = tc_mod.resolve("13.0", env={"CUDA_HOME": home}, which=_no_nvcc, nvidia_paths=[], usual_homes=())
    assert tc.ok, tc.problems


def test_torch_without_cuda():
    tc = tc_mod.resolve(None, env={}, which=_no_nvcc, nvidia_paths=[], usual_homes=())
    assert tc.problems == ["the installed torch has no CUDA (torch.version.cuda is None)"]


def test_link_dir_points_libcudart_at_the_chosen_runtime(tmp_path):
    nvidia = _fake_wheels(tmp_path / "site-packages")
    home = _fake_toolkit(tmp_path / "cuda", libs=())
    tc = tc_mod.resolve("13.0", env={"CUDA_HOME": home}, which=_no_nvcc, nvidia_paths=[nvidia], usual_homes=())
    folder = tc_mod.link_dir(tc, str(tmp_path / "link"))
    assert os.path.realpath(os.path.join(folder, "libcudart.so")) == os.path.realpath(tc.cudart)
    tc_mod.link_dir(tc, folder)  # again: replaces the link, no error


@pytest.mark.parametrize("arch_list, arch",
                         [("8.0;9.0", "80"), ("9.0+PTX", "90"), (" 7.5 8.6", "75"), ("10.0,12.0", "100")])
def test_first_arch(arch_list, arch):
    assert tc_mod.first_arch(arch_list) == arch


def _plan(mode, tmp_path, torch_cuda="13.0", **kw):
    kw.setdefault("env", {"CUDA_HOME": str(tmp_path / "no-toolkit")})
    return tc_mod.plan(mode, "2.14.1", torch_cuda, "9.0", which=_no_nvcc, nvidia_paths=[], usual_homes=(), **kw)


def test_auto_with_a_broken_toolkit_builds_cpu_only_with_a_warning(tmp_path, capsys):
    plan = _plan("auto", tmp_path)
    assert not plan.build
    broken = tmp_path / "no-toolkit"
    assert plan.why_not == f"CUDA_HOME={broken} is not a CUDA toolkit (no bin/nvcc and include/cuda_runtime.h there)"
    err = capsys.readouterr().err
    assert f"WARNING torch_ext: building WITHOUT the CUDA kernels (CPU only): {plan.why_not}" in err
    assert "TORCH_EXT_CUDA=1 to make this an error" in err


def test_auto_with_a_toolkit_without_cublaslt_names_it(tmp_path, capsys):
    home = _fake_toolkit(tmp_path / "cuda", libs=("cudart",))
    plan = _plan("auto", tmp_path, env={"CUDA_HOME": home})
    assert not plan.build and "no libcublasLt.so (CUDA 13)" in plan.why_not
    assert "no libcublasLt.so (CUDA 13)" in capsys.readouterr().err


def test_forced_with_a_broken_toolkit_fails_with_the_same_message(tmp_path):
    with pytest.raises(SystemExit) as e:
        _plan("1", tmp_path)
    assert str(e.value) == (f"torch_ext: TORCH_EXT_CUDA=1 but the CUDA build cannot work here: "
                            f"CUDA_HOME={tmp_path / 'no-toolkit'} is not a CUDA toolkit "
                            "(no bin/nvcc and include/cuda_runtime.h there)")


def test_forced_without_cuda_torch_fails(tmp_path):
    with pytest.raises(SystemExit, match=r"TORCH_EXT_CUDA=1 but the installed torch 2.14.1 has no CUDA"):
        _plan("1", tmp_path, torch_cuda=None)
    assert _plan("auto", tmp_path, torch_cuda=None).why_not.startswith("the installed torch 2.14.1 has no CUDA")


def test_off_never_looks(tmp_path, capsys):
    plan = _plan("0", tmp_path)
    assert not plan.build and plan.why_not == "TORCH_EXT_CUDA=0" and plan.tc is None
    assert capsys.readouterr().err == ""


def test_a_bad_mode_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="TORCH_EXT_CUDA must be 'auto', '0' or '1', got 'yes'"):
        _plan("yes", tmp_path)


@pytest.mark.skipif(not torch.version.cuda, reason="the probe needs the CUDA build of torch (its nvidia wheels)")
def test_probe_on_this_machine_matches_the_build():
    # The real nvcc (on the project's machines: 13.0 behind a wrapper script) compiles and links
    # the probe against the runtime and cuBLASLt of torch's wheels, in seconds.
    tc = tc_mod.resolve(torch.version.cuda)
    if not tc.ok:
        pytest.skip(f"no usable CUDA toolkit here: {tc.problems}")
    assert tc_mod.probe(tc, "9.0") is None


# --- python -m torch_ext ------------------------------------------------------------------------

FIELDS = ("torch_ext", "torch (built against)", "torch (running)", "torch CUDA", "CUDA kernels", "CUDA archs",
          "CUDA runtime linked", "cuBLASLt linked", "CUDA device", "CPU capability", "CPU float32 GEMM",
          "CPU bfloat16 GEMM", "CPU float16 GEMM", "run-time config", "C++ flags", "nvcc flags",
          "TORCH_EXT_CUDA at build")


def test_python_m_torch_ext_prints_every_field():
    res = subprocess.run([sys.executable, "-m", "torch_ext"], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [line.split("  ")[0].strip() for line in lines] == list(FIELDS)
    assert res.stdout.strip() == torch_ext.show_config().strip()


def test_show_config_tells_the_truth():
    text = dict((line[:23].strip(), line[23:].strip()) for line in torch_ext.show_config().splitlines())
    cfg = torch_ext._config.build_config()
    assert text["torch_ext"].startswith(torch_ext.__version__)
    assert text["torch (running)"].startswith(torch.__version__)
    assert text["CPU capability"].startswith(torch_ext.cpu_capability())
    assert text["CPU float32 GEMM"].startswith(torch_ext.cpu_gemm())
    assert cfg, "the installed package has no _build_config.py: setup.py did not write it"
    assert cfg["version"] == torch_ext.__version__
    assert cfg["cuda"] == torch_ext._C.built_with_cuda()
    assert text["CUDA kernels"].startswith("built" if cfg["cuda"] else "not built: ")
    if cfg["cuda"]:
        assert cfg["cuda_archs"] and text["CUDA archs"] == cfg["cuda_archs"]
        assert os.path.exists(cfg["cublaslt"]) and os.path.exists(cfg["cudart"])


def test_show_config_warns_on_a_torch_mismatch(monkeypatch):
    from torch_ext import _config

    real = _config.build_config()
    monkeypatch.setattr(_config, "build_config", lambda: dict(real or {"cxx_flags": []}, torch="1.0.0"))
    with pytest.warns(RuntimeWarning, match="built against torch 1.0.0 but torch .* is running"):
        text = torch_ext.show_config()
    assert "MISMATCH" in text


def test_source_folder_without_its_module_imports_the_installed_package(tmp_path):
    # Python started in a checkout's root finds the source folder first; with no compiled module
    # there it must load the installed package's, not fail with a circular import.
    import shutil

    installed = os.path.dirname(os.path.abspath(torch_ext._C.__file__))
    shutil.copytree(installed, tmp_path / "torch_ext",
                    ignore=shutil.ignore_patterns("_C.*", "_build_config.py", "__pycache__"))
    (tmp_path / "setup.py").write_text("# a checkout's root\n")
    res = subprocess.run([sys.executable, "-m", "torch_ext"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].endswith(f"at {installed}")
    code = ("import os, torch_ext, torch; print(os.path.dirname(torch_ext._C.__file__)); "
            "print(torch_ext.fused_linear(torch.ones(2, 3), torch.ones(4, 3)).sum().item())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [installed, "24.0"]


# --- the run-time config (torch_ext.get_config / set_config / config) ---------------------------


def test_set_config_checks_its_arguments(set_config):
    before = torch_ext.get_config()
    with pytest.raises(TypeError, match="no switch named 'cpu_gemmm'"):
        set_config(cpu_gemmm="aten")
    with pytest.raises(TypeError, match="panel_bytes must be an int, got '4096'"):
        set_config(panel_bytes="4096")
    with pytest.raises(TypeError, match="cpu_cache_bytes must be an int, got True"):
        set_config(cpu_cache_bytes=True)
    with pytest.raises(TypeError, match="cublaslt must be a bool, got 0"):
        set_config(cublaslt=0)
    with pytest.raises(ValueError, match="cpu_cache_bytes must be a non-negative number of bytes; got -1"):
        set_config(cpu_cache_bytes=-1)
    with pytest.raises(ValueError, match="cpu_gemm must be auto, ours or aten; got 'mkl'"):
        set_config(cpu_gemm="mkl")
    with pytest.raises(ValueError, match="panel_bytes must fit in 64 bits"):
        set_config(panel_bytes=2**70)
    with pytest.raises(ValueError, match="cpu_gemm must be"):  # all or nothing: the good change is not applied
        set_config(panel_bytes=before["panel_bytes"] + 4096, cpu_gemm="mkl")
    assert torch_ext.get_config() == before, "a refused change must change nothing"


def test_set_config_returns_what_restores_it(set_config):
    before = torch_ext.get_config()
    previous = set_config(panel_bytes=4096, cublaslt=not before["cublaslt"])
    assert previous == {"panel_bytes": before["panel_bytes"], "cublaslt": before["cublaslt"]}
    assert torch_ext.get_config() == {**before, "panel_bytes": 4096, "cublaslt": not before["cublaslt"]}
    set_config(**previous)
    assert torch_ext.get_config() == before
    with torch_ext.config(cpu_gemm="aten", panel_bytes=8192):
        assert torch_ext.get_config() == {**before, "cpu_gemm": "aten", "panel_bytes": 8192}
        assert torch_ext.cpu_gemm() == "aten"
    assert torch_ext.get_config() == before
    with pytest.raises(KeyError):  # restored on the way out of an error too
        with torch_ext.config(panel_bytes=1):
            raise KeyError("inside")
    assert torch_ext.get_config() == before


def _python_says_ok(code, env):
    proc = run_python(code + "print('ok')\n", env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_config_comes_from_the_environment_once():
    code = (
        "import os, torch_ext\n"
        "config = torch_ext.get_config()\n"
        "assert config == {'cpu_gemm': 'aten', 'panel_bytes': 4096, 'cublaslt': False, 'cpu_cache_bytes': 0}, config\n"
        "assert torch_ext.cpu_gemm() == 'aten'\n"
        "os.environ['TORCH_EXT_PANEL_BYTES'] = '8192'\n"
        "assert torch_ext.get_config()['panel_bytes'] == 4096\n"
    )
    _python_says_ok(code, {"TORCH_EXT_CPU_GEMM": "aten", "TORCH_EXT_PANEL_BYTES": "4096", "TORCH_EXT_CUBLASLT": "0",
                           "TORCH_EXT_CPU_CACHE_BYTES": "0"})


@pytest.mark.parametrize("variable,value,message", [
    ("TORCH_EXT_CPU_GEMM", "mkl", "TORCH_EXT_CPU_GEMM must be auto, ours or aten; got 'mkl'"),
    ("TORCH_EXT_PANEL_BYTES", "4k", "TORCH_EXT_PANEL_BYTES must be a non-negative number of bytes; got '4k'"),
    ("TORCH_EXT_CPU_CACHE_BYTES", "-1", "TORCH_EXT_CPU_CACHE_BYTES must be a non-negative number of bytes; got -1"),
])
def test_a_bad_environment_value_raises_naming_the_variable(variable, value, message):
    # Not at import: at each call that reads the config (the ops included).
    code = (
        "import torch, torch_ext\n"
        "x, w = torch.randn(40, 8), torch.randn(5, 8)\n"
        "for call in (torch_ext.get_config, torch_ext.cpu_gemm, lambda: torch_ext.fused_linear(x, w)):\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as e:\n"
        f"        assert {message!r} in str(e), e\n"
        "    else:\n"
        "        raise AssertionError(f'no error from {call}')\n"
    )
    _python_says_ok(code, {variable: value})


# --- inlining of the CPU kernels' vector math -----------------------------------------------------


def test_vector_math_is_inlined_into_the_kernels():
    # setup.py's _inline_flags: with GCC's default inlining budget per translation unit, each
    # capability library (every kernel in every dtype) outgrew it and GCC called ATen's
    # Vectorized<float>::exp_u20 out of line in the softmax loops: cross_entropy ran at ~2/3 speed.
    # An out-of-line copy of it in the module means that happened again.
    import shutil

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils' nm is not installed: the module's symbols cannot be listed")
    kernel_flags = torch_ext._config.build_config().get("cpu_kernel_flags")
    assert kernel_flags is not None, "torch_ext/_build_config.py has no cpu_kernel_flags: not built by this setup.py"
    if not any(flag.startswith("--param=large-unit-insns") for flag in kernel_flags):
        pytest.skip("built by a compiler other than GCC: setup.py leaves its inlining budget alone")
    symbols = subprocess.run([nm, "-C", torch_ext._C.__file__], capture_output=True, text=True, timeout=120).stdout
    outlined = sorted({line.split(" ", 2)[-1] for line in symbols.splitlines() if "exp_u20" in line})
    assert not outlined, f"vector math called out of line in the CPU kernels: {outlined}"
