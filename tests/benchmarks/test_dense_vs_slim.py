"""benchmarks/dense_vs_slim_latency.py: combining compile rounds into one ratio, and --compiles checked."""

from __future__ import annotations

import pytest

from tests.benchmark_modules import load_benchmark

bench = load_benchmark("dense_vs_slim_latency.py", "bench_dense_vs_slim")


def _round(blocks: list[float], share: float = 0.0, flagged: bool = False):
    ratio = bench.Ratio(float(sorted(blocks)[len(blocks) // 2]), blocks, (min(blocks), max(blocks)), share, 1, flagged)
    ratio.per_compile = [ratio.median]
    return ratio


def test_combine_rounds_takes_the_median_of_the_rounds_medians_and_pools_the_rest():
    rounds = [_round([2.0, 2.1, 2.2]), _round([1.8, 1.9, 1.9], share=0.3), _round([2.4, 2.5, 2.6], flagged=True)]
    combined = bench.combine_rounds(rounds)
    assert combined.median == pytest.approx(2.1)                 # median of 2.1, 1.9, 2.5: not of the pooled blocks
    assert combined.per_compile == pytest.approx([2.1, 1.9, 2.5])
    assert len(combined.block_ratios) == 9 and combined.attempts == 3
    assert combined.other_cpu_share == pytest.approx(0.3) and combined.flagged
    assert bench._ratio_cell(combined) == "2.100 (1.90-2.50)"    # the table shows the range over compiles


def test_one_round_keeps_its_own_figures_and_no_round_is_an_error():
    single = _round([1.0, 1.2, 1.1])
    assert bench.combine_rounds([single]).median == pytest.approx(1.1)
    with pytest.raises(ValueError):
        bench.combine_rounds([])


@pytest.mark.parametrize("flag", ["0", "-1"])
def test_compiles_below_one_is_one_line_and_exit_2(flag, capsys, tmp_path):
    code = bench.main(["--dense", str(tmp_path / "d"), "--slim", str(tmp_path / "s"), "--compiles", flag, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--compiles" in err[0]
    assert not (tmp_path / "o").exists()
