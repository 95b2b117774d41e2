"""Builds pyodlog and its compiled extension ``pyodlog._C``.

The C++ sources (``csrc/**/*.cpp``) are always compiled. The CUDA sources
(``csrc/**/*.cu``) are compiled whenever nvcc and the CUDA headers are found;
``PYODLOG_WITH_CUDA=1`` forces them on (and fails loudly if they cannot be
built), ``PYODLOG_WITH_CUDA=0`` forces them off.

Build with ``pip install --no-build-isolation -e .`` so that the extension is
compiled against the torch that is installed, not a throwaway copy.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup


def _locate_cuda_home() -> None:
    """Sets CUDA_HOME to the real toolkit when nvcc on PATH is a wrapper script.

    torch guesses CUDA_HOME as the folder above ``which nvcc``; a wrapper such as
    /usr/local/bin/nvcc would make that /usr/local, where libcudart is not. nvcc
    itself reports the toolkit it runs from (``TOP=`` in its dry-run output).
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or not shutil.which("nvcc"):
        return
    try:
        dry_run = subprocess.run(
            ["nvcc", "--dryrun", "-E", "-x", "cu", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stderr
    except (OSError, subprocess.SubprocessError):
        return
    match = re.search(r"^#\$ TOP=(.+)$", dry_run, flags=re.MULTILINE)
    if match:
        top = Path(match.group(1).strip()).resolve()
        if (top / "include" / "cuda_runtime.h").exists():
            os.environ["CUDA_HOME"] = str(top)


_locate_cuda_home()

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension reads it)
from torch.utils import cpp_extension  # noqa: E402

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
# Ampere and Hopper machine code, plus PTX so that newer GPUs JIT-compile it.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _want_cuda() -> bool:
    """Decides whether the CUDA sources are compiled (env override, else auto)."""
    setting = os.environ.get("PYODLOG_WITH_CUDA", "auto").strip().lower()
    found = cpp_extension.CUDA_HOME is not None and shutil.which("nvcc") is not None
    if setting in ("1", "true", "on", "yes"):
        if not found:
            sys.exit(
                "PYODLOG_WITH_CUDA=1 but no CUDA toolkit was found: put nvcc on PATH or set CUDA_HOME."
            )
        return True
    if setting in ("0", "false", "off", "no"):
        return False
    if setting != "auto":
        sys.exit(f"PYODLOG_WITH_CUDA must be 0, 1 or auto, got {setting!r}.")
    if found and torch.version.cuda is None:
        print(
            "pyodlog: nvcc found but this torch has no CUDA support; building the CPU kernels only."
        )
        return False
    return found


def _cuda_library_include_dirs() -> list[str]:
    """Finds the CUDA library headers (cusparse.h, cublas_v2.h, ...) that torch's headers include.

    pip-installed CUDA wheels put them under site-packages ``nvidia/<cuXX>/include`` or
    ``nvidia/<lib>/include``, not into the toolkit's own include folder.
    """
    dirs: list[str] = []
    for entry in sys.path:
        nvidia = Path(entry) / "nvidia"
        if not nvidia.is_dir():
            continue
        for include in sorted(nvidia.glob("*/include")):
            if any(include.glob("*.h")):
                dirs.append(str(include))
    return dirs


def _extension():
    with_cuda = _want_cuda()
    # Relative paths: setuptools refuses absolute source paths when it builds a wheel.
    os.chdir(ROOT)
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    # -fopenmp: at::parallel_for is a header template over OpenMP; without the
    # flag it silently runs on one thread.
    cxx_flags = [
        "-O3",
        "-std=c++20",
        "-fvisibility=hidden",
        "-fopenmp",
        '-DPYODLOG_TORCH_VERSION="' + torch.__version__ + '"',
    ]
    if with_cuda:
        sources += sorted(glob.glob("csrc/**/*.cu", recursive=True))
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        cxx_flags += ["-DPYODLOG_WITH_CUDA", f'-DPYODLOG_CUDA_ARCHS="{archs}"']
        nvcc_flags = [
            "-O3",
            "-std=c++20",
            # No fused multiply-add: the CUDA kernels then round exactly as the CPU kernels,
            # so a box kept on one device is kept on the other.
            "--fmad=false",
            "-DPYODLOG_WITH_CUDA",
        ]
        return cpp_extension.CUDAExtension(
            name="pyodlog._C",
            sources=sources,
            include_dirs=[str(CSRC)] + _cuda_library_include_dirs(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        name="pyodlog._C",
        sources=sources,
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(
        include=[
            "pyodlog",
            "pyodlog.*",
            "pyodlog_protocol",
            "pyodlog_protocol.*",
            "pyodlog_collector",
            "pyodlog_collector.*",
        ]
    ),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
