"""Which autocast dtype fast mode computes in, by device.

bf16 is fast only where the hardware multiplies in it: CUDA GPUs from Ampere on, and CPUs with
avx512_bf16 or AMX (oneDNN). Elsewhere torch emulates it, and bf16 is several times *slower* than
fp32: on an AVX2-only CPU, fast-mode AMG took 58 s an image in bf16 against 10 s in fp32 (README,
Performance). So fast mode's default, ``"auto"``, uses bf16 where it is native and fp32 elsewhere;
the rest of fast mode (large prompt batches, factored decoder tokens, folded attention) stays.

``"float16"`` is a pin for GPUs without bf16 but with fp16 tensor cores (Volta and Turing: V100,
T4), where fp32 leaves those cores idle. "auto" never picks it: fp16's narrower range is not
checked on real checkpoints here (the tests check its fidelity on CPU with small models).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

FAST_DTYPES = ("auto", "bfloat16", "float16", "float32")


def native_bf16(device: Union[str, torch.device]) -> bool:
    """Whether ``device`` multiplies bf16 in hardware (not emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):  # that GPU, not the current one (compute capability 8.0 on; ROCm)
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a torch without oneDNN's check: assume emulated
            return False
    return False


def check_fast_dtype(mode: str, fast_dtype: str) -> None:
    """Raise ``ValueError`` for a ``fast_dtype`` that is not one of :data:`FAST_DTYPES`, or a pin
    with exact mode (always fp32: a pin there is a contradiction, said rather than ignored)."""
    if fast_dtype not in FAST_DTYPES:
        raise ValueError(f"fast_dtype must be one of {FAST_DTYPES}, got {fast_dtype!r}.")
    if mode == "exact" and fast_dtype != "auto":
        raise ValueError(f"fast_dtype={fast_dtype!r} applies to mode='fast' only: exact mode computes in float32.")


def fast_amp_dtype(device: Union[str, torch.device], fast_dtype: str = "auto") -> Optional[torch.dtype]:
    """The autocast dtype of fast mode on ``device``: ``torch.bfloat16``, ``torch.float16`` or
    ``None`` (fp32, no autocast). ``fast_dtype``: "auto" (bf16 where :func:`native_bf16`, else
    fp32), or a pin: "bfloat16", "float16", "float32"."""
    check_fast_dtype("fast", fast_dtype)
    if fast_dtype == "auto":
        fast_dtype = "bfloat16" if native_bf16(device) else "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(fast_dtype)


def compute_dtype_name(amp_dtype: Optional[torch.dtype]) -> str:
    """What a model computed in, as recorded on each image of an output (its ``compute_dtype``):
    the autocast dtype's name ("bfloat16", "float16"), or "float32" without autocast (``None``)."""
    return "float32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")
