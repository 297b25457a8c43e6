"""The refinement trace: a figure of every step against the truth at each validation, in PNG and TensorBoard."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks.refinement_trace import Trace, trace_figure
from timerefine.pipeline.config import ConfigError, load_config


def test_trace_figure_has_a_panel_per_query_and_the_step_miou():
    traces = [
        Trace("person opens the door", 30.0, (5.0, 9.0), [(2.0, 14.0), (4.0, 10.0), (5.0, 9.0)]),
        Trace("someone sits", 12.0, (1.0, 3.0), [(math.nan, math.nan), (0.5, 4.0), (1.0, 3.5)]),
    ]
    figure = trace_figure(traces, [40.0, 55.5, 61.2], global_step=300)
    assert len(figure.axes) == 3
    panel = figure.axes[0]
    assert [t.get_text() for t in panel.get_yticklabels()] == ["truth", "coarse", "step 1", "step 2"]
    assert [(p.get_x(), p.get_width()) for p in panel.patches] == [
        (5.0, 4.0),
        (2.0, 12.0),
        (4.0, 6.0),
        (5.0, 4.0),
    ]
    assert len(figure.axes[1].patches) == 3  # an unparsed step draws no bar
    assert [p.get_height() for p in figure.axes[2].patches] == [40.0, 55.5, 61.2]
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    assert np.asarray(canvas.buffer_rgba()).shape[2] == 4


def test_refinement_trace_is_a_checked_count():
    assert load_config(["callbacks.refinement_trace=0"]).callbacks.refinement_trace == 0
    with pytest.raises(ConfigError, match=r"callbacks.refinement_trace=-1: must be an integer >= 0"):
        load_config(["callbacks.refinement_trace=-1"])


@pytest.mark.slow
def test_each_validation_writes_the_trace_png_and_tensorboard_image(builtin_run):
    # experiment=tiny validates at steps 10 and 20 (the sanity check and the closing validate draw nothing).
    assert sorted(p.name for p in (builtin_run / "refinement_trace").iterdir()) == [
        "step000010.png",
        "step000020.png",
    ]
    events = EventAccumulator(str(builtin_run / "logs" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("val/refinement_trace")
    assert [image.step for image in images] == [10, 20] and images[0].width > 500
