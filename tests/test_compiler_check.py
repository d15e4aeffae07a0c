"""compile=True without a system compiler fails when the model is set up, with a clear error."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.cpp_builder as cpp_builder

from sam_core import SamAutomaticMaskGenerator, SamPredictor, build_sam
from sam_core.compiler_check import require_compiler


@pytest.fixture(scope="module")
def model():
    return build_sam("tiny").eval()


def test_no_cpp_compiler_is_reported_at_construction(model, monkeypatch):
    def missing():
        raise cpp_builder.exc.InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    for mode in ("exact", "fast"):
        with pytest.raises(RuntimeError, match=r"compile=True, compile_encoder=True\) needs a C\+\+ compiler"):
            SamAutomaticMaskGenerator(model, mode=mode, compile=True)
    with pytest.raises(RuntimeError, match=r"C\+\+ compiler"):
        SamPredictor(model, compile_encoder=True)
    SamAutomaticMaskGenerator(model, mode="fast")  # without compile nothing is needed
    SamPredictor(model)


def test_cuda_needs_a_c_compiler(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs a C compiler"):
        require_compiler(torch.device("cuda"))
    monkeypatch.setenv("CC", "/opt/bin/cc")  # Triton takes $CC as given
    require_compiler(torch.device("cuda"))


def test_this_machine_has_a_cpp_compiler():
    require_compiler(torch.device("cpu"))  # the compile tests rely on it
