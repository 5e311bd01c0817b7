"""hvd_abs: elastic adaptive-batch-size (ABS/ABSA) training on Horovod.

The C++ extension `hvd_abs._C` (sources in cpp/) is optional: a CUDA build when torch is a CUDA
build and nvcc is found, else a CPU build. A failed build is reported and skipped, never fatal:
hvd_abs.second_order.vecops falls back to torch._foreach_* and then to a reference loop.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_home_from_nvcc() -> None:
    """Point CUDA_HOME at the toolkit of the nvcc on PATH when it is unset (as scripts/setup_env.sh
    does): torch guesses from nvcc's path, wrong when nvcc is a wrapper (/usr/local/bin/nvcc gave
    CUDA_HOME=/usr/local, and every build attempt failed). nvcc itself says where it lives."""
    import shutil
    import subprocess

    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or not shutil.which("nvcc"):
        return
    try:
        out = subprocess.run(["nvcc", "--dryrun", "-x", "cu", os.devnull, "-c", "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            os.environ["CUDA_HOME"] = os.path.realpath(line.split("=", 1)[1].strip())
            return


def extension_build():
    """(ext_modules, cmdclass) for the native ops, or ([], {}) when torch's build tools are missing."""
    cuda_home_from_nvcc()  # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        print("hvd_abs: torch not importable at build time: skipping the C++ extension", file=sys.stderr)
        return [], {}

    cpp = [os.path.join("cpp", f) for f in sorted(os.listdir(os.path.join(HERE, "cpp"))) if f.endswith(".cpp")]
    cu = [os.path.join("cpp", f) for f in sorted(os.listdir(os.path.join(HERE, "cpp"))) if f.endswith(".cu")]
    # -ffp-contract=off: no FMA contraction, so every build of the kernels rounds the same way.
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off"]
    openmp = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # at::parallel_for is a header template: without -fopenmp it runs serially. Compiled with
        # it but not linked to an OpenMP library: the GOMP_* symbols bind at load time to the
        # runtime torch already loaded (its libgomp, whatever its file name), so one thread pool.
        openmp = ["-fopenmp"]
    if not torch.cuda.is_available():
        # With no GPU to ask, torch's arch detection fails (an IndexError): one SASS target plus
        # PTX, which newer GPUs compile at load, as scripts/setup_env.sh does.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX")
    # The CUDA kernels (most of the build's time) where a GPU is visible or HVD_ABS_CUDA=1 asks
    # for them (a build machine without one, for GPU hosts); HVD_ABS_NO_CUDA=1 never.
    gpu_or_asked = torch.cuda.is_available() or os.environ.get("HVD_ABS_CUDA") == "1"
    want_cuda = torch.version.cuda is not None and ce.CUDA_HOME is not None and os.environ.get("HVD_ABS_NO_CUDA") != "1"
    if want_cuda and not gpu_or_asked:
        print("hvd_abs: no GPU visible: building the CPU kernels only (HVD_ABS_CUDA=1 builds the CUDA ones too)",
              file=sys.stderr)
        want_cuda = False
    if want_cuda and not os.path.exists(os.path.join(ce.CUDA_HOME, "bin", "nvcc")):
        # BuildExtension would stop the whole install on this, before any build can be retried.
        print(f"hvd_abs: WARNING: no nvcc under CUDA_HOME={ce.CUDA_HOME}: building the CPU kernels only "
              f"(set CUDA_HOME to a CUDA toolkit for the CUDA ones)", file=sys.stderr)
        want_cuda = False
    if want_cuda and cu:
        # torch's CUDA headers include the math libraries' headers (cusparse.h, cublas.h), which a
        # bare toolkit may lack; torch's own pip packages ship them, matching torch's CUDA version.
        # -idirafter: the toolkit's headers still win where both have a file.
        nvidia = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "include"))
        after = [flag for d in nvidia for flag in ("-idirafter", os.path.abspath(d))]
        ext = ce.CUDAExtension(
            "hvd_abs._C", cpp + cu, define_macros=[("HVD_ABS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx + openmp + after,
                                "nvcc": ["-O3", "-std=c++20"] + [f"-Xcompiler={f}" for f in after]},
        )
    cpu_ext = ce.CppExtension("hvd_abs._C", cpp, extra_compile_args={"cxx": cxx + openmp})
    if not (want_cuda and cu):
        ext = cpu_ext

    class OptionalBuild(ce.BuildExtension):
        """Never lets a broken toolchain break `pip install`: a failed build is retried without
        the CUDA kernels, then without OpenMP (serial CPU kernels), and a failure of all gives no
        extension (the PyTorch fallback)."""

        failed: set[str] = set()

        def _try(self, extension, what: str) -> bool:
            try:
                super().build_extension(extension)
                return True
            except Exception as exc:  # noqa: BLE001 - any compiler/linker failure
                print(f"hvd_abs: WARNING: {what} build of the C++ extension failed ({exc})", file=sys.stderr)
                return False

        def build_extension(self, extension):
            if self._try(extension, "the full"):
                return
            if any(s.endswith(".cu") for s in extension.sources):
                print("hvd_abs: WARNING: retrying the extension without CUDA kernels", file=sys.stderr)
                # The CPU extension's sources, macros and libraries: the CUDA one links cudart and
                # torch_cuda, which a machine whose CUDA build failed may not even have. The cxx
                # flags stay: BuildExtension added the module's name (-DTORCH_EXTENSION_NAME) to them.
                for attr in ("sources", "include_dirs", "library_dirs", "libraries", "extra_link_args"):
                    setattr(extension, attr, list(getattr(cpu_ext, attr)))
                extension.define_macros = [m for m in extension.define_macros if m[0] != "HVD_ABS_WITH_CUDA"]
                extension.extra_compile_args = {"cxx": list(extension.extra_compile_args["cxx"])}
                if self._try(extension, "the CPU-only"):
                    return
            if openmp:
                print("hvd_abs: WARNING: retrying the extension without OpenMP (serial kernels)", file=sys.stderr)
                extension.extra_compile_args = {"cxx": [f for f in extension.extra_compile_args["cxx"]
                                                        if f != "-fopenmp"]}
                if self._try(extension, "the serial CPU"):
                    return
            print("hvd_abs: WARNING: no C++ extension; using the PyTorch fallback", file=sys.stderr)
            self.failed.add(extension.name)

        def copy_extensions_to_source(self):
            # An editable install copies built libraries into the tree: skip the ones that failed.
            self.extensions = [e for e in self.extensions if e.name not in self.failed]
            super().copy_extensions_to_source()

    return [ext], {"build_ext": OptionalBuild.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_build()

# Metadata, dependencies and the console script: pyproject.toml.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
