"""Benchmark paths the quick runs in test_bench_scripts.py do not take: bench.gpu_step's batch search
(a GPU's), arguments that left nothing to time, a split too small for a decoding batch."""

from __future__ import annotations

import pytest
import torch

from bench import decoding, gpu_step, overhead


def test_the_batch_search_of_gpu_step_runs_a_step():
    """Review: the search timed 0 steps and divided by 0, so the script failed on every GPU."""
    shape = gpu_step.SHAPES["tiny"]
    dataset, codec = gpu_step.data(shape, 64)
    module = gpu_step.build(shape, codec, torch.device("cpu"))
    assert gpu_step.fits(module, dataset, codec, 2, torch.device("cpu"))


@pytest.mark.parametrize(
    ("script", "argv", "named"),
    [
        (overhead, ["--quick", "--warmup", "12"], "--warmup 12"),  # before: both clocks from 0, a ratio of 1
        (overhead, ["--rounds", "0"], "--rounds"),  # before: StatisticsError
        (gpu_step, ["--quick", "--steps", "0"], "--steps"),  # before: ZeroDivisionError
        (gpu_step, ["--batch", "0"], "--batch"),  # before: max() of an empty sequence
        (decoding, ["--singles", "0", "experiment=tiny"], "the test split holds 8 queries"),  # an IndexError
    ],
)
def test_counts_that_leave_nothing_to_measure_are_one_error_line(script, argv, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.main(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and named in error, error
