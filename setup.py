"""Build vpo._C with CMake + pybind11 (torch-free), so `pip install -e .` works on any machine.

- C++ CPU sources are always built; CUDA sources when CMake finds a CUDA compiler (archs from VPO_CUDA_ARCHS).
- VPO_SKIP_CUDA_BUILD=1 skips CUDA. If the CUDA configure/build fails, the CPU-only build is retried.
- If even the CPU build fails (no C++ compiler), the install still succeeds without vpo._C and says so; `import vpo`
  works and `vpo.AVAILABLE["cpp"]` is False.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        skip_cuda = _truthy("VPO_SKIP_CUDA_BUILD")
        try:
            self._cmake(ext, out, skip_cuda)
        except (subprocess.CalledProcessError, OSError) as err:
            if not skip_cuda:
                self.warn(f"vpo: CUDA-enabled build failed ({err}); retrying with CPU sources only")
                try:
                    self._cmake(ext, out, True)
                    return
                except (subprocess.CalledProcessError, OSError) as err2:
                    err = err2
            self.warn(f"vpo: building vpo._C failed ({err}); installing without the C++ extension")

    def _cmake(self, ext: Extension, out: Path, skip_cuda: bool) -> None:
        import pybind11

        cmake = shutil.which("cmake")
        if cmake is None:
            raise OSError("cmake not found")
        build_dir = Path(self.build_temp).resolve() / ("cpu" if skip_cuda else "full")
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("VPO_CUDA_ARCHS", "80;90").replace(",", ";")
        cfg = [
            cmake, str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out.parent}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DVPO_SKIP_CUDA_BUILD={'ON' if skip_cuda else 'OFF'}",
            f"-DVPO_CUDA_ARCHS={archs}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        subprocess.run(cfg, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        built = next(out.parent.glob("_C*" + Path(out).suffix), None)
        if built is None:
            raise OSError(f"CMake built nothing named _C* in {out.parent}")
        if built.resolve() != out:
            shutil.copyfile(built, out)


setup(ext_modules=[CMakeExtension("vpo._C")], cmdclass={"build_ext": CMakeBuild})
