"""Fast mode's autocast dtype follows the device: bf16 where it is native, fp32 where emulated."""

from __future__ import annotations

import pytest
import torch

from bench.common import cpu_model
from pipeline.config import PipelineConfig
from sam_core import SamAutomaticMaskGenerator, SamPredictor
from sam_core import precision
from sam_core.amg import check_generator_settings
from sam_core.precision import fast_amp_dtype, native_bf16


def test_cpu_bf16_is_native_exactly_where_the_cpu_has_bf16_instructions():
    """oneDNN's check agrees with /proc/cpuinfo (avx512_bf16 or amx_bf16: ``cpu_model`` names them)."""
    flags = open("/proc/cpuinfo").read()  # the suite runs on Linux
    listed = " avx512_bf16" in flags or " amx_bf16" in flags
    assert native_bf16("cpu") == listed == ("bf16" in cpu_model())
    assert not native_bf16("meta")


@pytest.mark.parametrize("ampere", [True, False])
def test_cuda_bf16_is_native_from_ampere_on(monkeypatch, ampere):
    """The GPU asked about is the one checked, and emulated bf16 (before Ampere) does not count."""
    import contextlib

    asked = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext(asked.append(d)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or ampere)
    assert native_bf16("cuda:1") == ampere and asked == [torch.device("cuda:1")]
    assert fast_amp_dtype("cuda:1") == (torch.bfloat16 if ampere else None)


def test_fast_dtype_choices():
    assert fast_amp_dtype("cpu", "bfloat16") == torch.bfloat16
    assert fast_amp_dtype("cpu", "float16") == torch.float16  # a pin only: "auto" never picks it
    assert fast_amp_dtype("cpu", "float32") is None
    assert fast_amp_dtype("cpu") == (torch.bfloat16 if native_bf16("cpu") else None)
    with pytest.raises(ValueError, match="fast_dtype must be one of"):
        fast_amp_dtype("cpu", "half")


@pytest.mark.parametrize("native", [True, False])
def test_fast_mode_uses_bf16_only_where_native(tiny_ours, monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    gen = SamAutomaticMaskGenerator(tiny_ours, mode="fast")
    assert gen.amp_dtype == gen.predictor.amp_dtype == (torch.bfloat16 if native else None)
    # The rest of fast mode stays: large prompt batches and factored decoder tokens.
    assert gen.factored_decoder and gen.decoder_batch == 256
    for fast_dtype, amp in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", None)):
        assert SamAutomaticMaskGenerator(tiny_ours, mode="fast", fast_dtype=fast_dtype).amp_dtype == amp
    assert SamAutomaticMaskGenerator(tiny_ours).amp_dtype is None  # exact: fp32


@pytest.mark.parametrize("fast_dtype", ["bfloat16", "float16", "float32"])
def test_exact_mode_refuses_a_fast_dtype_pin(tiny_ours, fast_dtype):
    """A pin with exact mode is a contradiction (exact computes in fp32): said, not ignored."""
    with pytest.raises(ValueError, match="applies to mode='fast' only"):
        SamAutomaticMaskGenerator(tiny_ours, fast_dtype=fast_dtype)
    with pytest.raises(ValueError, match="applies to mode='fast' only"):
        PipelineConfig("in", "out", amg={"fast_dtype": fast_dtype}).check_model()


@pytest.mark.parametrize("native", [True, False])
def test_fast_prompter_uses_bf16_only_where_native(monkeypatch, native):
    from pipeline.prompted import BoxPrompter

    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    prompter = BoxPrompter("tiny", None, device="cpu", mode="fast")
    assert isinstance(prompter.predictor, SamPredictor) and prompter.predictor.factored_decoder
    assert prompter.predictor.amp_dtype == (torch.bfloat16 if native else None)
    assert BoxPrompter("tiny", None, device="cpu").predictor.amp_dtype is None


def test_bad_fast_dtype_is_refused_before_a_run(tiny_ours):
    with pytest.raises(ValueError, match="fast_dtype must be one of"):
        check_generator_settings(fast_dtype="fp8")
    with pytest.raises(ValueError, match="fast_dtype must be one of"):
        SamAutomaticMaskGenerator(tiny_ours, mode="fast", fast_dtype="half")
    cfg = PipelineConfig("in", "out", model_type="tiny", amg={"fast_dtype": "half"}, mode="fast")
    with pytest.raises(ValueError, match="fast_dtype must be one of"):
        cfg.check_model()


def test_fast_dtype_is_part_of_a_runs_settings_only_when_given():
    """Outputs made before the setting existed keep their settings hash; pinning a dtype changes
    the masks, so it changes the hash."""
    base = PipelineConfig("in", "out", amg={"points_per_side": 8}, mode="fast")
    auto = PipelineConfig("in", "out", amg={"points_per_side": 8, "fast_dtype": "auto"}, mode="fast")
    pinned = PipelineConfig("in", "out", amg={"points_per_side": 8, "fast_dtype": "bfloat16"}, mode="fast")
    assert "fast_dtype" not in base.mask_settings()
    assert base.effective_mask_settings() == auto.effective_mask_settings()
    assert base.settings_hash() != pinned.settings_hash()
    assert base.effective_mask_settings() != pinned.effective_mask_settings()


@pytest.mark.parametrize("argv, expected", [([], "auto"), (["--fast-dtype", "float32"], "float32"),
                                            (["--fast-dtype", "float16"], "float16")])
def test_fast_dtype_flag(argv, expected):
    from jobs.generate import config_from_args, parse_args

    cfg = config_from_args(parse_args(["--output", "o", "--mode", "fast", *argv]))
    assert cfg.resolved_generator_settings()["fast_dtype"] == expected
    assert ("fast_dtype" in cfg.mask_settings()) == bool(argv)
