"""``trainer.precision: auto``: bf16 autocast only where bf16 is native, an explicit value as set, and the
choice said once and recorded in the run's outputs (train.py, evaluate.py, the Grounder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import evaluate
from timerefine.inference import run_loading
from timerefine.inference.run_loading import LoadedRun
from timerefine.pipeline import precision
from timerefine.pipeline.build import build_datamodule, build_module, build_trainer
from timerefine.pipeline.config import ConfigError, load_config
from timerefine.pipeline.precision import (
    Capabilities,
    PrecisionError,
    choose_precision,
    cpu_bf16_instructions,
    cpu_kernel_limit,
    resolve_precision,
)

ROOT = Path(__file__).resolve().parents[1]
# /proc/cpuinfo flags (abridged) of an AVX2-only AMD EPYC and of an Intel Xeon with AVX-512 BF16 and AMX.
EPYC_AVX2 = "flags\t\t: fpu sse sse2 avx avx2 fma bmi2 sha_ni clzero\n"
XEON_AMX = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n"
CPU_WITH_BF16 = Capabilities(cuda_bf16=False, cpu_bf16=("AVX-512 BF16", "AMX-BF16"))
CPU_WITHOUT_BF16 = Capabilities(cuda_bf16=False, cpu_bf16=())
CPU_CAPPED = Capabilities(False, ("AVX-512 BF16",), "oneDNN is limited to AVX2 (ONEDNN_MAX_CPU_ISA)")
AMPERE = Capabilities(cuda_bf16=True, cpu_bf16=())
VOLTA = Capabilities(cuda_bf16=False, cpu_bf16=("AVX-512 BF16",))


def probe_of(capabilities: Capabilities):
    return lambda: capabilities


@pytest.mark.parametrize(
    ("device", "capabilities", "expected"),
    [
        ("cpu", CPU_WITH_BF16, "bf16-mixed"),
        ("cpu", CPU_WITHOUT_BF16, "32-true"),
        ("cpu", CPU_CAPPED, "32-true"),
        ("cuda", AMPERE, "bf16-mixed"),
        ("cuda", VOLTA, "32-true"),  # a CPU's bf16 says nothing about the GPU's
        ("cpu", AMPERE, "32-true"),  # nor a GPU's about the CPU's
        ("mps", CPU_WITH_BF16, "32-true"),
    ],
)
def test_auto_takes_bf16_only_where_it_is_native(device, capabilities, expected):
    choice = choose_precision("auto", device, probe_of(capabilities))
    assert choice.precision == expected
    assert choice.reason.startswith("auto: ")


@pytest.mark.parametrize(("device", "capabilities"), [("cpu", CPU_WITH_BF16), ("cuda", AMPERE)])
def test_auto_keeps_float16_weights_out_of_bf16_autocast(device, capabilities):
    """Before (review): model.lm.dtype=float16 under auto took bf16-mixed on a CPU with bf16, and the
    first optimizer step failed (RuntimeError: Unexpected floating ScalarType in at::autocast::prioritize,
    which torch raises on any device)."""
    choice = choose_precision("auto", device, probe_of(capabilities), lm_dtype="float16")
    assert choice.precision == "32-true" and "float16" in choice.reason
    assert (
        choose_precision("auto", device, probe_of(capabilities), lm_dtype="bfloat16").precision
        == "bf16-mixed"
    )


@pytest.mark.parametrize(
    ("requested", "device"), [("bf16-mixed", "cpu"), ("bf16-mixed", "cuda"), ("16-mixed", "cpu")]
)
def test_a_requested_bf16_autocast_over_float16_weights_is_refused(requested, device):
    """Before: trainer.precision=bf16-mixed (or 16-mixed on a CPU) with model.lm.dtype=float16 was the
    same RuntimeError traceback at the first step. A trained run answers in fp32 instead."""
    with pytest.raises(PrecisionError, match=f"trainer.precision={requested} with model.lm.dtype=float16"):
        choose_precision(requested, device, probe_of(AMPERE), lm_dtype="float16")
    answering = choose_precision(requested, device, probe_of(AMPERE), lm_dtype="float16", answering=True)
    assert answering.precision == "32-true"
    assert choose_precision("16-mixed", "cuda", probe_of(AMPERE), lm_dtype="float16").precision == "16-mixed"


def test_fp16_autocast_on_a_cpu_is_recorded_as_the_bf16_lightning_runs():
    """Before (review): recorded as 16-mixed, while Lightning warned and ran bf16-mixed."""
    choice = choose_precision("16-mixed", "cpu", probe_of(CPU_WITH_BF16))
    assert (choice.precision, choice.reason) == (
        "bf16-mixed",
        "trainer.precision=16-mixed: a CPU has no fp16 autocast",
    )
    assert choose_precision("16-mixed", "cuda", probe_of(AMPERE)).precision == "16-mixed"


@pytest.mark.parametrize(
    ("device", "capabilities", "width", "expected"),
    [
        ("cpu", CPU_WITH_BF16, 128, "32-true"),  # the tiny default: bf16 did not pay (1.09x on a Xeon)
        ("cpu", CPU_WITH_BF16, 256, "bf16-mixed"),
        ("cpu", CPU_WITH_BF16, None, "bf16-mixed"),  # a pretrained LM
        ("cuda", AMPERE, 128, "bf16-mixed"),  # on a GPU the width does not decide
    ],
)
def test_on_a_cpu_auto_keeps_a_narrow_tiny_lm_in_fp32(device, capabilities, width, expected):
    choice = choose_precision("auto", device, probe_of(capabilities), tiny_lm_width=width)
    assert choice.precision == expected
    if expected == "32-true":
        assert "the tiny LM is 128 wide (< 256)" in choice.reason


def test_the_reason_names_what_was_found():
    assert "AVX-512 BF16 and AMX-BF16" in choose_precision("auto", "cpu", probe_of(CPU_WITH_BF16)).reason
    assert "no AVX-512 BF16 or AMX-BF16" in choose_precision("auto", "cpu", probe_of(CPU_WITHOUT_BF16)).reason
    assert "ONEDNN_MAX_CPU_ISA" in choose_precision("auto", "cpu", probe_of(CPU_CAPPED)).reason


@pytest.mark.parametrize("requested", ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_explicit_precision_is_used_as_set(requested, device):
    def no_probe() -> Capabilities:
        raise AssertionError("an explicit precision needs no probe")

    expected = (
        "bf16-mixed" if (requested, device) == ("16-mixed", "cpu") else requested
    )  # as Lightning runs it
    assert choose_precision(requested, device, no_probe).precision == expected


def test_cpu_flags():
    assert cpu_bf16_instructions(EPYC_AVX2) == ()
    assert cpu_bf16_instructions(XEON_AMX) == ("AVX-512 BF16", "AMX-BF16")
    assert cpu_bf16_instructions("model name\t: avx512_bf16 in a name, not a flag\n") == ()


@pytest.mark.parametrize(
    ("aten", "onednn", "limited"),
    [
        ("AVX512", None, False),
        ("AVX512", "ALL", False),
        ("AVX512", "AVX512_CORE_AMX", False),
        ("AVX512", "AVX512_CORE_BF16", False),
        ("AVX512", "AVX2", True),
        ("AVX512", "avx512_core", True),
        ("AVX2", None, True),
        ("DEFAULT", None, True),
    ],
)
def test_kernel_limits(aten, onednn, limited):
    assert (cpu_kernel_limit(aten, onednn) is not None) == limited


def test_auto_is_the_default_and_other_values_are_refused():
    assert load_config([]).trainer.precision == "auto"
    assert load_config(["trainer.precision=32-true"]).trainer.precision == "32-true"
    with pytest.raises(ConfigError, match=r"trainer\.precision=bf17-mixed: must be one of auto, 32-true"):
        load_config(["trainer.precision=bf17-mixed"])


def tiny_config(tmp_path: Path, *overrides: str):
    tiny = ["experiment=tiny", "trainer.accelerator=cpu", "logger.csv=false", "logger.tensorboard=false"]
    return load_config([*tiny, f"output_dir={tmp_path}", *overrides])


WIDE = "model.lm.tiny.hidden_size=256"  # as wide as bf16 autocast needs on a CPU under auto
NARROW = "model.lm.tiny.hidden_size=32"


@pytest.mark.parametrize(
    ("capabilities", "requested", "width", "expected"),
    [
        (CPU_WITH_BF16, "auto", WIDE, "bf16-mixed"),
        (CPU_WITH_BF16, "auto", NARROW, "32-true"),
        (CPU_WITHOUT_BF16, "auto", WIDE, "32-true"),
        (CPU_WITHOUT_BF16, "bf16-mixed", NARROW, "bf16-mixed"),
        (CPU_WITH_BF16, "32-true", WIDE, "32-true"),
    ],
)
def test_the_trainer_gets_the_choice(monkeypatch, tmp_path, capabilities, requested, width, expected):
    monkeypatch.setattr(precision, "machine_capabilities", probe_of(capabilities))
    cfg = tiny_config(tmp_path, f"trainer.precision={requested}", width)
    trainer = build_trainer(cfg, tmp_path, build_module(cfg, build_datamodule(cfg)))
    assert trainer.precision == expected


@pytest.mark.parametrize(
    ("capabilities", "requested", "width", "expected"),
    [
        (CPU_WITH_BF16, "auto", WIDE, torch.bfloat16),
        (CPU_WITH_BF16, "auto", NARROW, None),
        (CPU_WITHOUT_BF16, "auto", WIDE, None),
        (CPU_WITHOUT_BF16, "bf16-mixed", NARROW, torch.bfloat16),
    ],
)
def test_the_grounder_runs_as_evaluate_does(monkeypatch, tmp_path, capabilities, requested, width, expected):
    """A run trained with ``auto`` predicts with what ``auto`` gives on this machine for its LM."""
    monkeypatch.setattr(run_loading, "machine_capabilities", probe_of(capabilities))
    cfg = tiny_config(tmp_path, f"trainer.precision={requested}", width)
    run = LoadedRun(cfg, SimpleNamespace(device=torch.device("cpu")), None, tmp_path)
    with run_loading.precision_plugin(run.precision, "cpu").forward_context():
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    assert dtype == expected


def test_a_run_trained_with_bf16_autocast_answers_float16_weights_in_fp32(monkeypatch, tmp_path):
    """A run trained with trainer.precision=16-mixed on a GPU, answering on a CPU (16 -> bf16 there)."""
    monkeypatch.setattr(run_loading, "machine_capabilities", probe_of(CPU_WITH_BF16))
    cfg = tiny_config(
        tmp_path, "trainer.precision=16-mixed", "model.lm.dtype=float16", "model.lora.enabled=true"
    )
    run = LoadedRun(cfg, SimpleNamespace(device=torch.device("cpu")), None, tmp_path)
    assert run.precision == "32-true"


EMULATED_AVX2 = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def train(output_dir: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    overrides = [
        "experiment=tiny",
        "trainer.max_steps=2",
        "model.saliency.projector_steps=0",
        "trainer.val_check_interval=2",
        "logger.tensorboard=false",
        *extra,
    ]
    result = subprocess.run(
        [sys.executable, "train.py", *overrides, f"output_dir={output_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, **env),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def said_and_recorded(result: subprocess.CompletedProcess, metrics: Path) -> tuple[str, str]:
    """The precision the run said it chose (one INFO line) and the one its metrics.json records."""
    said = [line for line in result.stderr.splitlines() if " precision: " in line]
    assert len(said) == 1, said
    recorded = json.loads(metrics.read_text())
    assert said[0].endswith(
        f"precision: {recorded['trainer/precision']} ({recorded['trainer/precision_reason']})"
    )
    return recorded["trainer/precision"], recorded["trainer/precision_reason"]


@pytest.mark.slow
def test_a_run_says_and_records_its_precision(tmp_path):
    result = train(tmp_path / "run", {})
    here = resolve_precision("auto", "auto", load_config(["experiment=tiny"]).model.lm.tiny.hidden_size)
    assert said_and_recorded(result, tmp_path / "run" / "metrics.json") == (here.precision, here.reason)
    assert evaluate.main([str(tmp_path / "run")]) == 0  # evaluated with what auto gives here, recorded too
    recorded = json.loads((tmp_path / "run" / "eval" / "test" / "metrics.json").read_text())
    assert recorded["trainer/precision"] == here.precision


@pytest.mark.slow
def test_without_bf16_instructions_the_run_is_fp32(tmp_path):
    """torch's kernels limited to AVX2 (as on an AVX2-only CPU): the default run takes 32-true."""
    result = train(tmp_path / "run", EMULATED_AVX2)
    chosen, reason = said_and_recorded(result, tmp_path / "run" / "metrics.json")
    assert chosen == "32-true" and reason.startswith("auto: ")


@pytest.mark.slow
def test_a_true_half_precision_run_trains(tmp_path):
    """Before: trainer.precision=bf16-true (or 16-true, 64-true) was a traceback on every run: Lightning's
    input conversion refused the batch's frozen records (the on-policy items too), then the saliency and
    aux heads got fp32 inputs beside their bf16 weights (found by review)."""
    on_policy = ["fraction=1.0", "every_n_steps=1", "num_samples=4"]
    result = train(
        tmp_path / "run",
        {},
        "trainer.precision=bf16-true",
        *(f"model.refine.on_policy.{setting}" for setting in on_policy),
    )
    chosen, _ = said_and_recorded(result, tmp_path / "run" / "metrics.json")
    assert chosen == "bf16-true"


def test_train_py_refuses_bf16_autocast_over_float16_weights_in_one_line(tmp_path, capsys):
    """Before: a RuntimeError traceback at the first step, exit 1, after config.yaml was written."""
    import train

    output_dir = tmp_path / "run"
    float16 = ["model.lm.dtype=float16", "model.lora.enabled=true", "trainer.precision=bf16-mixed"]
    assert (
        train.main(["experiment=tiny", "trainer.accelerator=cpu", *float16, f"output_dir={output_dir}"]) == 2
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: trainer.precision=bf16-mixed with model.lm.dtype=float16"), lines
    assert not output_dir.exists()
