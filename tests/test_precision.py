"""`auto` precision: bf16 only where the CPU (or GPU) computes it natively."""

import pytest
import torch

from alignkit import precision
from alignkit.engine.config import TrainConfig
from alignkit.models.load import ModelConfig
from alignkit.rollout.hf import _resolve_dtype

ZEN3 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16 amx_int8\n"


@pytest.mark.parametrize("text, native", [(ZEN3, False), (ZEN4, True), (SAPPHIRE, True),
                                          ("model name\t: avx512_bf16 in a name, not a flag\n", False)])
def test_cpu_flags(tmp_path, text, native):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert precision.cpu_has_native_bf16(str(path)) is native


def test_no_cpuinfo_means_fp32(tmp_path):
    assert precision.cpu_has_native_bf16(str(tmp_path / "missing")) is False


@pytest.mark.parametrize("native", [False, True])
def test_auto_follows_the_cpu(monkeypatch, native):
    if torch.cuda.is_available():
        pytest.skip("with CUDA, 'auto' follows the GPU")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    expected = "bf16" if native else "fp32"
    assert precision.resolve_precision("auto", "cpu") == expected
    assert TrainConfig(precision="auto", device="cpu").precision == expected
    assert ModelConfig(dtype="auto").dtype == ("bfloat16" if native else "float32")
    assert _resolve_dtype("auto") == (torch.bfloat16 if native else None)


def test_explicit_values_pass_through(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    assert TrainConfig(precision="bf16").precision == "bf16"
    assert ModelConfig(dtype="bfloat16").dtype == "bfloat16"
