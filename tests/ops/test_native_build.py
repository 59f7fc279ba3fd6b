"""Building and loading the native epilogues (are_fast.ops.native): what an unbuildable library reports, the
fallback to the PyTorch epilogues, the ARE_FAST_NATIVE default, the --check and --plan commands, setup.py, the
ahead-of-time build, and a compile-only check of the CUDA sources. The epilogues' arithmetic is test_native.py's."""
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import are_fast
from _helpers import assert_rel_close, make_inputs, run_op
from are_fast.ops import native
from are_fast.ops.backends import resolve_backend

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def unbuildable(monkeypatch, tmp_path):
    """A fresh loader, swapped in for the real one, whose build cannot work: no C++ compiler, empty cache."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ARE_FAST_NATIVE_DIR", str(tmp_path / "cache"))
    library = native.NativeLibrary()
    monkeypatch.setattr(native, "library", library)
    return library


def test_unbuildable_library_reports_why_and_logs_once(unbuildable, caplog):
    with caplog.at_level(logging.WARNING, logger="are_fast.ops.native"):
        assert not unbuildable.load(build=True)
        assert not unbuildable.load(build=True)
    assert "no C++ compiler" in unbuildable.reason and "no-such-compiler" in unbuildable.reason
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1


def test_missing_ninja_and_failing_compiler_are_reported(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setenv("ARE_FAST_NATIVE_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    library = native.NativeLibrary()
    assert not library.load() and "ninja is not installed" in library.reason
    monkeypatch.undo()
    monkeypatch.setenv("ARE_FAST_NATIVE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", shutil.which("false"))  # a "compiler" that always fails
    library = native.NativeLibrary()
    assert not library.load() and "failed" in library.reason and library.path is None


def test_missing_sources_are_reported(monkeypatch):
    monkeypatch.setattr(native, "_sources_dir", lambda: None)
    library = native.NativeLibrary()
    assert not library.load() and "csrc/epilogues.cpp" in library.reason


def test_fallback_to_pytorch_epilogues(unbuildable, monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="backend='native' is unavailable: no C.. compiler"):
        resolve_backend("native", cpu)
    monkeypatch.setenv("ARE_FAST_BACKEND", "native")
    masters = make_inputs()
    with pytest.raises(ValueError, match="unavailable"):
        are_fast.compression_loss(masters["hidden"].float(), masters["weight"].float(), masters["labels"])
    monkeypatch.delenv("ARE_FAST_BACKEND")
    for mode in ("auto", "1", "0"):
        monkeypatch.setenv("ARE_FAST_NATIVE", mode)
        assert resolve_backend(None, cpu) == "online"
    monkeypatch.setenv("ARE_FAST_NATIVE", "1")
    ref, upstream, ref_grads = run_op("conditional_kl-sum", masters, torch.float64, "reference", True)
    out, _, grads = run_op("conditional_kl-sum", masters, torch.float32, None, True, upstream=upstream)
    assert_rel_close(out, ref, torch.float32, "value through the fallback")
    assert_rel_close(grads["hidden"], ref_grads["hidden"], torch.float32, "d/dhidden through the fallback")


def test_default_backend_follows_are_fast_native(ops, monkeypatch):
    """With no backend named: ARE_FAST_NATIVE=1 takes the native epilogues, 0 never, auto only from an
    ahead-of-time build and only on CUDA; an explicit backend always wins."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("ARE_FAST_NATIVE", "1")
    assert resolve_backend(None, cpu) == "native"
    assert resolve_backend("chunked", cpu) == "chunked"  # the PyTorch epilogues stay reachable
    monkeypatch.setenv("ARE_FAST_NATIVE", "0")
    assert resolve_backend(None, cpu) == "online"
    monkeypatch.setenv("ARE_FAST_NATIVE", "auto")  # an installed ahead-of-time build, on CUDA only
    assert resolve_backend(None, cpu) == "online"
    monkeypatch.setattr(native, "ahead_of_time_builds", lambda: ["_native.so"])
    monkeypatch.setattr(native.library, "load", lambda build=False: True)
    monkeypatch.setattr(native, "supports", lambda device: True)
    assert resolve_backend(None, cpu) == "online"  # measured slower than the online sweep on CPU
    assert native.use_by_default(torch.device("cuda"))
    monkeypatch.setattr(native, "ahead_of_time_builds", lambda: [])
    assert not native.use_by_default(torch.device("cuda"))  # not what this process happened to load
    monkeypatch.setenv("ARE_FAST_NATIVE", "yes")
    with pytest.raises(ValueError, match="ARE_FAST_NATIVE: expected one of auto, 0, 1, got 'yes'"):
        resolve_backend(None, cpu)


def run_python(args, env_extra, cwd=REPO, timeout=300):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_check_command(ops, tmp_path):
    built = run_python(["-m", "are_fast.ops.native", "--check"], {})
    assert built.returncode == 0, built.stdout + built.stderr
    assert "available" in built.stdout and "are_fast::logprob_epilogue(Tensor(a!) logits" in built.stdout
    assert "are_fast::kl_epilogue(Tensor(a!) logits_p, Tensor(b!) logits_q" in built.stdout
    assert "are_fast::jsd_epilogue(Tensor(a!) logits_p, Tensor(b!) logits_q, Tensor valid, Tensor? grad_scale, " \
           "float beta" in built.stdout
    assert "RuntimeWarning" not in built.stderr
    broken = {"CXX": str(tmp_path / "no-such-compiler"), "ARE_FAST_NATIVE_DIR": str(tmp_path / "cache")}
    missing = run_python(["-m", "are_fast.ops.native", "--check"], broken)
    assert missing.returncode == 1 and "NOT available: no C++ compiler" in missing.stdout, missing.stdout
    imported = run_python(["-c", "import are_fast.ops.native as n; print(n.library.path, n.library.reason)"], broken)
    assert imported.returncode == 0 and imported.stdout.split() == ["None", "None"], imported.stderr


def test_plan_command_builds_nothing(tmp_path):
    """--plan (what the GPU check logs before its native build step) names the sources and an empty cache."""
    planned = run_python(["-m", "are_fast.ops.native", "--plan"], {"ARE_FAST_NATIVE_DIR": str(tmp_path)})
    assert planned.returncode == 0, planned.stderr
    assert "are_fast native build: epilogues.cpp" in planned.stdout and "C++ compiler:" in planned.stdout
    assert f"cache: {tmp_path}" in planned.stdout and "empty: the first use builds it" in planned.stdout
    assert not any(tmp_path.rglob("*.so"))


def test_setup_py_imports_torch_only_for_the_native_build():
    plain = run_python(["-X", "importtime", "setup.py", "--version"], {"ARE_FAST_BUILD_NATIVE": "0"})
    assert plain.returncode == 0 and plain.stdout.strip() == are_fast.__version__, plain.stderr
    assert " torch" not in plain.stderr  # -X importtime lists every imported module on stderr


def test_ahead_of_time_build_is_loaded_first(tmp_path):
    """ARE_FAST_BUILD_NATIVE=1 builds are_fast/_native*.so (one more compile, 15-40 s), which the loader prefers,
    with no compiler in sight; the CPU default stays the online sweep (measured faster), native when named."""
    skip = shutil.ignore_patterns("__pycache__", "*.so")
    for name in ("setup.py", "README.md", "are_fast", "kernels", "csrc"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, tmp_path / name, ignore=skip)
        else:
            shutil.copy(REPO / name, tmp_path / name)
    build = run_python(["setup.py", "-q", "build_ext", "--inplace"], {"ARE_FAST_BUILD_NATIVE": "1"}, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    assert list((tmp_path / "are_fast").glob("_native*.so"))
    probe = (
        "import torch, are_fast.ops.native as n; from are_fast.ops.backends import resolve_backend; "
        "cpu = torch.device('cpu'); print(resolve_backend(None, cpu), resolve_backend('native', cpu), n.library.origin)"
    )
    env = {"PYTHONPATH": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")}
    loaded = run_python(["-c", probe], env, cwd=tmp_path)
    assert loaded.stdout.split() == ["online", "native", "ahead-of-time"], loaded.stdout + loaded.stderr


def test_cuda_sources_compile(tmp_path):
    """Compile only (no GPU needed): csrc/epilogues_cuda.cu with torch's headers for sm_90."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources cannot be compiled here")
    from torch.utils.cpp_extension import include_paths

    torch_include = Path(include_paths()[0])
    defines = []
    if not (torch_include / "c10/cuda/impl/cuda_cmake_macros.h").is_file():
        defines = ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]  # a CPU-only torch ships no generated CUDA macros header
    command = [nvcc, "-c", str(REPO / "csrc/epilogues_cuda.cu"), "-o", str(tmp_path / "epilogues_cuda.o"),
               "-std=c++17", "-O3", "-arch=sm_90", "-Xcompiler", "-fPIC", *defines,
               *[f"-I{path}" for path in include_paths()]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    assert (tmp_path / "epilogues_cuda.o").stat().st_size > 0
