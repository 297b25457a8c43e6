"""The benchmark only rewrites its own section of bench/RESULTS.md."""

from __future__ import annotations

from bench.data_loading import update_section


def test_update_section_keeps_other_sections():
    text = "# Benchmark results\n\n## Training\n\nfast\n\n## Data loading\n\nold\n\n## Eval\n\nok\n"
    out = update_section(text, "new numbers")
    assert out == text.replace("\nold\n", "\nnew numbers\n")
    assert update_section(out, "new numbers") == out
    assert update_section("", "x") == "# Benchmark results\n\n## Data loading\n\nx\n"
    assert update_section("# R\n\n## Eval\n\nok\n", "x") == "# R\n\n## Eval\n\nok\n\n## Data loading\n\nx\n"
    assert update_section("## Data loading\n\nold\n", "x") == "## Data loading\n\nx\n"
