"""The extension loader: where sources come from, cache keys, the cross-process build lock,
compiler failures reported with the compiler's words, and the warning when "auto" falls back.

The real install paths (pip install <checkout>, <sdist>, a wheel) are exercised end to end by
scripts/check_install_paths.sh, which .ci/run runs after this suite.
"""
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import grl_kernels as G
from grl_kernels.backends import extension, registry
from grl_kernels.backends.extension import build_config as cfg


def test_source_root_of_a_checkout_holds_the_sources():
    root = extension.source_root()
    for s in cfg.CPU_SOURCES + cfg.CUDA_SOURCES:
        assert (root / s).is_file(), s


def test_build_folder_depends_on_sources_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("GRL_KERNELS_CACHE", str(tmp_path))
    root = extension.source_root()
    a = extension.build_dir_for("cpu", root, {"extra_cflags": ["-O3"]})
    assert a == extension.build_dir_for("cpu", root, {"extra_cflags": ["-O3"]})  # reused
    assert a != extension.build_dir_for("cpu", root, {"extra_cflags": ["-O2"]})  # other flags
    assert a.parent.name.startswith(f"torch{torch.__version__.replace('+', '_')}-py")  # per torch
    copy = tmp_path / "src"
    for sub in ("cpu", "cuda", "include"):
        (copy / "csrc" / sub).mkdir(parents=True)
    (copy / "csrc" / "cpu" / "a.cpp").write_text("int x;")
    b = extension.build_dir_for("cpu", copy, {"extra_cflags": ["-O3"]})
    (copy / "csrc" / "cpu" / "a.cpp").write_text("int y;")
    assert b != extension.build_dir_for("cpu", copy, {"extra_cflags": ["-O3"]})  # changed sources
    # per kind: a CUDA source edit keeps the CPU build, and changes the CUDA ones; headers count for all
    b = extension.build_dir_for("cpu", copy, {"extra_cflags": ["-O3"]})
    c = extension.build_dir_for("cuda", copy, {"extra_cflags": ["-O3"]})
    e = extension.build_dir_for("cuda_emu", copy, {"extra_cflags": ["-O3"]})
    (copy / "csrc" / "cuda" / "k.cu").write_text("__global__ void k() {}")
    assert b == extension.build_dir_for("cpu", copy, {"extra_cflags": ["-O3"]})
    assert c != extension.build_dir_for("cuda", copy, {"extra_cflags": ["-O3"]})
    assert e != extension.build_dir_for("cuda_emu", copy, {"extra_cflags": ["-O3"]})
    (copy / "csrc" / "include" / "g.h").write_text("#pragma once")
    assert b != extension.build_dir_for("cpu", copy, {"extra_cflags": ["-O3"]})


def test_wheel_flags_are_portable_and_jit_flags_native(monkeypatch):
    monkeypatch.delenv("GRL_KERNELS_NATIVE", raising=False)
    monkeypatch.delenv("GRL_KERNELS_PORTABLE", raising=False)
    assert "-march=native" not in cfg.cpu_cflags(native=cfg.setup_native())  # setup.py: wheels
    assert "-march=native" in cfg.cpu_cflags()  # just in time, on the machine that runs it
    monkeypatch.setenv("GRL_KERNELS_NATIVE", "1")
    assert "-march=native" in cfg.cpu_cflags(native=cfg.setup_native())
    monkeypatch.setenv("GRL_KERNELS_PORTABLE", "1")
    assert "-march=native" not in cfg.cpu_cflags()


def test_compiler_failure_is_reported_with_the_compilers_message(tmp_path, monkeypatch, capsys):
    from torch.utils import cpp_extension

    def fail(**kw):
        raise RuntimeError(
            "Error building extension 'grl_kernels_C_cpu': [1/3] c++ -c stripe.cpp\n"
            "stripe.cpp:12:5: error: 'foo' was not declared in this scope\n"
            "ninja: build stopped: subcommand failed."
        )

    monkeypatch.setattr(cpp_extension, "load", fail)
    with pytest.raises(extension.ExtensionUnavailable) as info:
        extension._locked_build("cpu", "grl_kernels_C_cpu", [], extension.source_root(), {}, tmp_path / "b")
    msg = str(info.value)
    assert "'foo' was not declared" in msg and "g++" in msg and "pip install ninja" in msg
    assert "'foo' was not declared" in capsys.readouterr().err


def test_a_finished_build_is_imported_without_running_the_build_tools(tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    build = tmp_path / "cpu-abc"
    build.mkdir()
    (build / "m.so").write_bytes(b"")
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: pytest.fail("rebuilt a finished build"))
    monkeypatch.setattr(extension, "_import_built", lambda name, so: ("imported", name, so))
    got = extension._locked_build("cpu", "m", [], extension.source_root(), {}, build)
    assert got == ("imported", "m", build / "m.so")


def test_a_broken_cached_build_is_rebuilt(tmp_path, monkeypatch, capsys):
    from torch.utils import cpp_extension

    build = tmp_path / "cpu-abc"
    build.mkdir()
    (build / "m.so").write_bytes(b"not an ELF file")  # e.g. a build killed while linking
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: "rebuilt")
    assert extension._locked_build("cpu", "m", [], extension.source_root(), {}, build) == "rebuilt"
    assert "rebuilding" in capsys.readouterr().err


def test_missing_compiler_is_named_before_building(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setattr(extension.shutil, "which", lambda name: None)
    monkeypatch.setenv("GRL_KERNELS_CACHE", "/nonexistent-never-created")
    with pytest.raises(extension.ExtensionUnavailable, match="a C\\+\\+ compiler .*no-such-compiler-xyz"):
        extension._jit("cpu")


def test_packaged_sources_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(extension, "source_root", lambda: tmp_path)
    with pytest.raises(extension.ExtensionUnavailable, match="extension sources not found .*reinstall"):
        extension._jit("cpu")


_BUILDER = textwrap.dedent(
    """
    import sys, time
    from torch.utils import cpp_extension
    from grl_kernels.backends import extension
    log = sys.argv[2]
    def fake_load(**kw):  # stands in for the compiler: records when it runs
        with open(log, "a") as f:
            f.write(f"start {time.time()}\\n")
        t = time.time()  # hold the lock until the other process is waiting for it
        while open(log).read().count("ready") < 2 and time.time() - t < 60:
            time.sleep(0.05)
        time.sleep(1.5)
        with open(log, "a") as f:
            f.write(f"end {time.time()}\\n")
        return "module"
    cpp_extension.load = fake_load
    with open(log, "a") as f:
        f.write("ready\\n")
    assert extension._locked_build("cpu", "m", [], extension.source_root(), {}, extension.Path(sys.argv[1])) == "module"
    """
)


def test_two_processes_never_build_at_once(tmp_path):
    log = tmp_path / "log.txt"
    build = tmp_path / "build"
    build.mkdir()
    (build / "lock").write_text("")  # torch's baton left behind by a killed build: must not hang us
    procs = [subprocess.Popen([sys.executable, "-c", _BUILDER, str(build), str(log)], stderr=subprocess.PIPE)
             for _ in range(2)]
    errs = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    events = [ln.split() for ln in log.read_text().splitlines() if ln != "ready"]
    assert [e[0] for e in events] == ["start", "end", "start", "end"], events  # serialized, not interleaved
    assert any("another process is building" in e for e in errs), errs


def test_auto_fallback_warns_once_with_the_reason(monkeypatch):
    fake = registry.Backend(
        name="fake_fused", stripe=None, window=None, devices=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32}), priority=1000,
        check_available=lambda: (False, "no compiler found; install g++"),
    )
    monkeypatch.setitem(registry._REGISTRY, "fake_fused", fake)
    monkeypatch.setattr(registry, "_warned", set())
    with pytest.warns(G.FallbackWarning, match="'fake_fused' is unavailable \\(no compiler found; install g\\+\\+\\)"):
        chosen = registry.resolve_backend("auto", torch.device("cpu"), torch.float32)
    assert chosen.name != "fake_fused"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        registry.resolve_backend("auto", torch.device("cpu"), torch.float32)  # once only
        # a dtype the unavailable backend does not take: nothing was skipped, no warning
        registry.resolve_backend("auto", torch.device("cpu"), torch.float16)


def test_a_backend_module_that_fails_to_import_is_registered_unavailable(monkeypatch):
    from grl_kernels import backends

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    backends._register_or_report("no_such_backend_module", [("broken_fused", "cpu")])
    ok, why = dict((n, (o, w)) for n, o, w in G.backend_info())["broken_fused"]
    assert not ok and "no_such_backend_module failed to import (ModuleNotFoundError" in why
    with pytest.raises(G.BackendUnavailableError, match="'broken_fused' is not available: .*failed to import"):
        registry.resolve_backend("broken_fused", torch.device("cpu"), torch.float32)
