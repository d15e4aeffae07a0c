"""Fail early when ``torch.compile`` cannot work on this machine.

Inductor builds the kernels it generates with a system compiler: a C++ compiler on CPU, and a C
compiler for Triton's kernel launchers on CUDA. Without one, ``torch.compile`` fails only at the
first compiled call, deep inside a run; ``require_compiler`` says so when the model is set up.
"""

from __future__ import annotations

import os
import shutil

import torch


def require_compiler(device: torch.device) -> None:
    """Raise ``RuntimeError`` if ``torch.compile`` on ``device`` has no compiler to build with."""
    if device.type == "cuda":
        # Triton's own search: $CC, then gcc, then clang.
        found = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
        need = "a C compiler (gcc or clang, or $CC), which Triton uses to build its kernel launchers"
    else:
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
        except ImportError:  # inductor's internals moved: torch.compile will report for itself
            return
        try:
            found = get_cpp_compiler()  # inductor's own search ($CXX, g++)
        except Exception:
            found = None
        need = "a C++ compiler (g++ or clang++, or $CXX), which inductor uses to build CPU kernels"
    if not found:
        raise RuntimeError(
            f"torch.compile (compile=True, compile_encoder=True) needs {need}; none was found on this "
            "machine. Install one (Debian/Ubuntu: apt-get install build-essential) or run without compile."
        )
