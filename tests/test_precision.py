"""bf16 only where the hardware computes it natively (emulated bf16 is 15-50x slower on AVX2 CPUs)."""

import pytest
import torch

from qtuning_plugin import precision
from qtuning_plugin.precision import compute_dtype, describe_precision, native_bf16


def cpu_probes(monkeypatch, avx512_bf16, amx):
    """Monkeypatch torch's private CPU probes; None removes one (an older / other torch)."""
    for name, value in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx)):
        if value is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda value=value: value, raising=False)


def cpuinfo(monkeypatch, tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 {flags}\n\n")
    monkeypatch.setattr(precision, "CPUINFO", str(path))


@pytest.mark.parametrize("avx512_bf16, amx, want", [(False, False, False), (True, False, True), (False, True, True)])
def test_cpu_uses_bf16_only_with_avx512_bf16_or_amx(monkeypatch, tmp_path, avx512_bf16, amx, want):
    cpuinfo(monkeypatch, tmp_path, "avx512_bf16 amx_bf16")  # the probes win over /proc/cpuinfo
    cpu_probes(monkeypatch, avx512_bf16, amx)
    assert native_bf16("cpu") is want
    assert compute_dtype("cpu") == (torch.bfloat16 if want else torch.float32)
    line = describe_precision("cpu")
    assert line.startswith("precision: bf16 autocast" if want else "precision: fp32")
    if amx and not avx512_bf16:
        assert "AMX" in line


def test_describe_names_fp32_and_why_on_a_cpu_without_bf16(monkeypatch):
    cpu_probes(monkeypatch, False, False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    line = describe_precision("cpu")
    assert "fp32" in line and "AVX2" in line and "no native bf16" in line and "\n" not in line


@pytest.mark.parametrize("flags, want", [("", None), ("avx512_bf16", "AVX512-BF16"), ("amx_tile amx_bf16", "AMX")])
def test_cpuinfo_fallback_without_the_private_probes(monkeypatch, tmp_path, flags, want):
    cpu_probes(monkeypatch, None, None)
    cpuinfo(monkeypatch, tmp_path, flags)
    assert native_bf16("cpu") is (want is not None)
    if want:
        assert describe_precision("cpu") == f"precision: bf16 autocast (CPU with {want})"
    monkeypatch.setattr(precision, "CPUINFO", str(tmp_path / "missing"))  # no /proc: fp32
    assert native_bf16("cpu") is False


def test_a_failing_probe_falls_back_to_cpuinfo(monkeypatch, tmp_path):
    def broken():
        raise RuntimeError("no cpuinfo backend")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", broken, raising=False)
    cpuinfo(monkeypatch, tmp_path, "avx512_bf16")
    assert native_bf16("cpu") is True


def test_cuda_and_other_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert native_bf16("cuda") is True and compute_dtype("cuda:0") == torch.bfloat16
    assert native_bf16() is True  # the default device is CUDA when there is one
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert native_bf16("cuda") is False  # emulated (pre-Ampere): fp32
    assert native_bf16("mps") is False and describe_precision("mps").startswith("precision: fp32")
    assert compute_dtype("mps") == torch.float32


# ---------------------------------------------------------------------- the demo's trainer configuration

class _Stop(Exception):
    pass


@pytest.mark.parametrize("model, native, want", [("some-model", False, False), ("some-model", True, True),
                                                 ("tiny", True, False)])
def test_demo_trains_in_bf16_only_where_native(model, native, want, monkeypatch, tmp_path, capsys):
    """The SFTConfig the demo builds: bf16 follows native_bf16 (not 'any CPU'), never for the tiny model."""
    trl = pytest.importorskip("trl")
    from qtuning_plugin import cli, demo
    from qtuning_plugin.models import tiny

    seen = {}

    def config(**kwargs):  # stop before training: only the configuration is under test
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(trl, "SFTConfig", config)
    monkeypatch.setattr(demo, "native_bf16", lambda device=None: native)
    monkeypatch.setattr(demo, "describe_precision", lambda device=None: f"precision: patched {native}")
    monkeypatch.setattr(demo, "load", lambda name: (*tiny(), f"{name} (stand-in)"))  # no SmolLM2 load
    args = cli.build_parser().parse_args(["demo", "--model", model, "--out", str(tmp_path / "demo")])
    with pytest.raises(_Stop):
        demo.run_demo(args)
    assert seen["bf16"] is want and seen["use_cpu"] is not torch.cuda.is_available()
    err = capsys.readouterr().err
    assert ("precision: fp32 (the tiny model)" if model == "tiny" else f"precision: patched {native}") in err
