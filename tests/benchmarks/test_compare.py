"""benchmarks/compare.py: the uniform width finder, Torch-Pruning landing on the FLOPs target, the
table arithmetic and resuming; and the pieces it added to the project (Trainer.start_slim)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from lapp_edge.lapp.flops import build_flops_cost, count_deployed_macs
from lapp_edge.lapp.widths import allowed_widths, uniform_widths
from lapp_edge.models import build_model, prunable_sites
from lapp_edge.models.slicing import resize_to_widths
from tests.benchmark_modules import load_benchmark

REPO = Path(__file__).resolve().parents[2]


compare = load_benchmark("compare.py", "bench_compare")


def _resnet20_cost():
    model = build_model("resnet20", 1, 10, False, True)
    sites = prunable_sites(model)
    return model, sites, build_flops_cost(model, sites, (1, 28, 28))


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_uniform_widths_land_on_the_target_in_multiples_of_8(target: float) -> None:
    model, sites, cost = _resnet20_cost()
    widths, ratio, factor = uniform_widths(cost, target, 8, 8, tolerance=0.01)
    assert abs(ratio - target) <= 0.01
    assert all(int(w) in allowed_widths(site.channels, 8, 8) for w, site in zip(widths, sites))
    resize_to_widths(model, sites, {s.name: int(w) for s, w in zip(sites, widths)})
    assert count_deployed_macs(model, (1, 28, 28)) / cost.dense_macs == pytest.approx(ratio)
    # no site is far from the one factor times its full width (at most one rounding step either side
    # of the nearest allowed width, where the width search had to mix roundings)
    for width, full in zip(widths, cost.site_channels):
        assert abs(int(width) - factor * full) <= 8 + 4 + 1e-9


def test_uniform_widths_are_one_factor_where_plain_rounding_lands() -> None:
    _, sites, cost = _resnet20_cost()
    widths, ratio, factor = uniform_widths(cost, 0.3, 8, 8, tolerance=0.01)
    expected = [int(allowed_widths(s.channels, 8, 8)[np.abs(allowed_widths(s.channels, 8, 8) - factor * s.channels).argmin()])
                for s in sites]
    assert widths.tolist() == expected


@pytest.fixture(scope="module")
def trained_like_resnet20() -> torch.nn.Module:
    """A dense ResNet-20 whose weights and BN scales differ per channel, as a trained one's do."""
    torch.manual_seed(3)
    model = build_model("resnet20", 1, 10, False, False)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data = torch.rand_like(module.weight) + 0.05
    return model.eval()


@pytest.mark.parametrize("method", ["tp-l1", "tp-bn", "tp-gn"])
def test_torch_pruning_lands_on_the_flops_target_and_the_network_runs(method: str, trained_like_resnet20) -> None:
    pytest.importorskip("torch_pruning", reason="the Torch-Pruning methods need torch_pruning")
    pruned, outcome = compare.prune_to_target(method, trained_like_resnet20, "resnet20", (1, 28, 28), 0.5, 8)
    assert abs(outcome.flops_ratio - 0.5) <= 0.01, outcome
    assert pruned(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    convs = [m for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 and c.out_channels >= 8 for c in convs)
    # the widths name the project's coupled sites: the same shapes rebuilt from them take the weights
    rebuilt = build_model("resnet20", 1, 10, False, True)
    resize_to_widths(rebuilt, prunable_sites(rebuilt), outcome.widths)
    rebuilt.load_state_dict(pruned.state_dict())
    rebuilt.eval()
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(rebuilt(x), pruned(x))
    assert outcome.flops_ratio == pytest.approx(count_deployed_macs(rebuilt, (1, 28, 28)) / count_deployed_macs(
        build_model("resnet20", 1, 10, False, True), (1, 28, 28)))


def _result(method: str, target: float | None, seed: int, top1: float, wall: float, latency: float | None = None):
    return compare.RunResult(method=method, target=target, seed=seed, top1=top1, flops_ratio=1.0 if target is None else target,
                             params_ratio=0.5, epochs=3, train_wall_s=wall, train_cpu_s=wall / 2, latency_ratio=latency)


def test_summary_means_and_spreads_over_seeds() -> None:
    results = [
        _result("dense", None, 0, 0.90, 100.0, 1.0), _result("dense", None, 1, 0.92, 120.0, 1.0),
        _result("lapp", 0.5, 0, 0.88, 130.0, 0.6), _result("lapp", 0.5, 1, 0.86, 150.0, 0.7),
        _result("uniform", 0.5, 0, 0.80, 60.0),
    ]
    by_key = {(s.method, s.target): s for s in compare.summarize(results)}
    lapp = by_key[("lapp", 0.5)]
    assert lapp.seeds == 2
    assert lapp.top1_mean == pytest.approx(0.87)
    assert lapp.top1_sd == pytest.approx(statistics.stdev([0.88, 0.86]))
    assert lapp.top1_vs_dense_points == pytest.approx(100 * (0.87 - 0.91))
    assert lapp.wall_vs_dense == pytest.approx(140.0 / 110.0)
    assert lapp.cpu_vs_dense == pytest.approx(70.0 / 55.0)
    assert lapp.latency_ratio == pytest.approx(0.65)
    uniform = by_key[("uniform", 0.5)]
    assert uniform.top1_sd == 0.0 and uniform.latency_ratio is None
    assert [s.method for s in compare.summarize(results)] == ["dense", "uniform", "lapp"]   # dense first, then METHODS order
    table = compare.markdown_table(compare.summarize(results))
    assert "| lapp | 0.5 | 2 | 87.00 ± 1.41 | -4.00 |" in table
    assert "| 0.650 ± 0.071 |" in table


def test_goal_check_names_the_best_peer_and_pairs_seeds() -> None:
    results = [
        _result("dense", None, 0, 0.90, 100.0, 1.0), _result("dense", None, 1, 0.92, 100.0, 1.0),
        _result("lapp", 0.3, 0, 0.88, 60.0), _result("lapp", 0.3, 1, 0.86, 80.0),
        _result("uniform", 0.3, 0, 0.87, 40.0), _result("uniform", 0.3, 1, 0.85, 40.0),
        _result("tp-gn", 0.3, 0, 0.84, 70.0), _result("tp-gn", 0.3, 1, 0.86, 70.0),
        _result("lapp-no-bypass", 0.3, 0, 0.95, 50.0),            # an ablation is not a peer
    ]
    summaries = compare.summarize(results)
    (check,) = compare.goal_checks(results, summaries)
    assert check.best_peer == "uniform" and check.margin_points == pytest.approx(1.0)
    assert check.paired_points["uniform"] == pytest.approx([1.0, 1.0])
    assert check.paired_points["tp-gn"] == pytest.approx([4.0, 0.0])
    assert check.cpu_vs_dense == pytest.approx(35.0 / 50.0) and check.accuracy_goal_met and check.time_goal_met
    table = compare.goals_table([check])
    assert "| 0.3 | uniform (86.00) | 87.00 | +1.00 (met) |" in table and "tp-gn +2.00 (2.83): +4.00, +0.00" in table
    results[2] = _result("lapp", 0.3, 0, 0.862, 60.0)             # now +0.1 over uniform: not met
    (check,) = compare.goal_checks(results, compare.summarize(results))
    assert not check.accuracy_goal_met and "(not met)" in compare.goals_table([check])
    results[2] = _result("lapp", 0.3, 0, 0.8771, 60.0)            # +0.30 exactly (as a float, 0.29999...): met
    results[4:6] = [_result("uniform", 0.3, 0, 0.8751, 40.0), _result("uniform", 0.3, 1, 0.8560, 40.0)]
    (check,) = compare.goal_checks(results, compare.summarize(results))
    assert check.margin_points < 0.3 and check.margin_points == pytest.approx(0.3) and check.accuracy_goal_met


def test_variants_are_paired_with_lapp_by_seed() -> None:
    results = [
        _result("dense", None, 0, 0.90, 100.0), _result("dense", None, 1, 0.92, 100.0),
        _result("lapp", 0.5, 0, 0.88, 80.0), _result("lapp", 0.5, 1, 0.86, 60.0),
        _result("lapp-keep-bypass", 0.5, 0, 0.885, 60.0), _result("lapp-keep-bypass", 0.5, 1, 0.85, 54.0),
        _result("lapp-keep-bypass", 0.5, 2, 0.99, 10.0),        # no LAPP run of seed 2: not paired
        _result("uniform", 0.5, 0, 0.80, 40.0),                    # a peer, not a variant
    ]
    (check,) = compare.variant_checks(results, compare.summarize(results))
    assert check.method == "lapp-keep-bypass" and check.seeds == [0, 1]
    assert check.paired_points == pytest.approx([0.5, -1.0]) and check.cpu_vs_lapp == pytest.approx([0.75, 0.9])
    assert check.cpu_vs_dense == pytest.approx((114.0 / 2 / 2) / 50.0)
    table = compare.variants_table([check])
    assert "| lapp-keep-bypass | 0.5 | 2 | -0.25 (1.06): +0.50, -1.00 | 0.82: 0.75, 0.90 | 0.57 |" in table


def test_result_counts_the_freeze_between_epochs(tmp_path: Path) -> None:
    job = compare.Job("lapp", 0.5, 0)
    _finish(job, tmp_path)
    assert compare.result_of(job, tmp_path).train_cpu_s == pytest.approx(4.5)      # a report without freeze times
    report_path = job.run_dir(tmp_path) / "report.json"
    report = json.loads(report_path.read_text())
    report["freeze_seconds"] = {"wall": 3.0, "cpu": 2.5}
    report_path.write_text(json.dumps(report))
    result = compare.result_of(job, tmp_path)
    assert result.train_cpu_s == pytest.approx(7.0) and result.train_wall_s == pytest.approx(9.0)


def test_goal_check_flags_means_over_different_seeds() -> None:
    results = [_result("dense", None, 0, 0.90, 100.0), _result("lapp", 0.5, 0, 0.88, 60.0), _result("lapp", 0.5, 1, 0.86, 60.0),
               _result("tp-gn", 0.5, 1, 0.85, 70.0)]                  # tp-gn's seed 0 failed
    (check,) = compare.goal_checks(results, compare.summarize(results))
    assert check.paired_points["tp-gn"] == pytest.approx([1.0]) and (check.lapp_seeds, check.best_peer_seeds) == (2, 1)
    assert "[LAPP over 2 seeds, tp-gn over 1]" in compare.goals_table([check])


def _finish(job, out: Path, top1: float = 0.5) -> None:
    run = job.run_dir(out)
    run.mkdir(parents=True, exist_ok=True)
    report = {"accuracy": {"test_top1": top1}, "flops": {"ratio": job.target or 1.0}, "params": {"slim": 1, "dense": 2},
              "epochs": [{"seconds": 2.0, "cpu_seconds": 1.5}] * 3}
    (run / "report.json").write_text(json.dumps(report))


def test_lapp_efficient_lands_the_flops_under_a_latency_ceiling_of_target_over_min_efficiency(tmp_path: Path) -> None:
    """lapp-efficient trains what `make demo` trains: FLOPs landed on the target, ORT fp32 latency at most target /
    --min-efficiency of dense (as the layer table predicts it), branches removable but the first of each stage; the
    flags are ones `lapp-edge train` accepts together (no --flops-target beside the latency budget)."""
    from lapp_edge.cli import build_parser
    from lapp_edge.cli.flags import given_options
    from lapp_edge.training.config import TrainConfig, refuse_ignored_options, validate_config

    args = compare.build_parser().parse_args(["--out", str(tmp_path), "--epochs", "8", "--min-efficiency", "0.8"])
    [job] = compare.plan_jobs(["lapp-efficient"], [0.5], [0])
    command = compare.job_command(job, args)
    flags = command[command.index("train") + 1:]
    assert "--flops-target" not in flags
    for flag, value in (("--max-flops", "0.5"), ("--latency-target", "0.6250"), ("--target", "x86-ort-fp32"),
                        ("--latency-batch", "32"), ("--keep-blocks", "1"), ("--channel-multiple", "8")):
        assert flags[flags.index(flag) + 1] == value, flag
    given = given_options(build_parser().parse_args(["train", *flags]), TrainConfig)
    refuse_ignored_options(given)
    config = TrainConfig(**given)
    validate_config(config)
    assert config.land_on_flops and config.block_removal and config.latency_constrained and config.max_flops == 0.5
    for bad in (["--flops-targets", "0.9"], ["--min-efficiency", "0"]):            # ceiling above dense; no ceiling
        assert compare.main(["--out", str(tmp_path), "--methods", "lapp-efficient", *bad]) == 2
    assert "lapp-efficient" not in compare.build_parser().parse_args([]).methods      # opt-in: it needs a layer table


def test_lapp_efficient_without_a_layer_table_here_is_refused_before_training(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr("lapp_edge.training.latency.target_machine_key", lambda _backend: "A CPU nobody profiled; avx2")
    monkeypatch.chdir(tmp_path)
    assert compare.main(["--out", str(tmp_path / "out"), "--methods", "dense,lapp-efficient", "--flops-targets", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "lapp-efficient needs a layer table for x86-ort-fp32 / resnet20 / 1x28x28 on this machine" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_resume_skips_finished_runs_and_resumes_unfinished_ones(tmp_path: Path, monkeypatch, capsys) -> None:
    args = compare.build_parser().parse_args(["--out", str(tmp_path), "--epochs", "3", "--seeds", "0",
                                              "--flops-targets", "0.5", "--methods", "dense,lapp,uniform"])
    jobs = compare.plan_jobs(["dense", "lapp", "uniform"], [0.5], [0])
    assert [j.label for j in jobs] == ["dense seed 0", "lapp @ 0.5 seed 0", "uniform @ 0.5 seed 0"]
    _finish(jobs[0], tmp_path)
    lapp_run = jobs[1].run_dir(tmp_path)
    lapp_run.mkdir(parents=True)
    (lapp_run / "checkpoint.pt").write_bytes(b"")
    assert [compare.job_state(j, tmp_path) for j in jobs] == ["done", "resume", "new"]
    command = compare.job_command(jobs[1], args)
    assert command[command.index("--out") + 1] == str(lapp_run) and "--resume" in command
    assert "--only" in compare.job_command(jobs[2], args)      # uniform runs in this script's worker mode

    launched: list[list[str]] = []

    def fake_run(command, **kwargs):
        launched.append(command)
        job = jobs[1] if "lapp_edge.cli" in command else jobs[2]
        _finish(job, tmp_path, 0.7)
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(compare.CHILDREN, "run", fake_run)
    assert compare.run_jobs(jobs, args) == []
    assert len(launched) == 2                                  # the finished dense run was not launched again
    assert "1 already finished, 2 to train" in capsys.readouterr().out
    launched.clear()
    assert compare.run_jobs(jobs, args) == [] and launched == []   # everything finished: nothing runs


class _Stop(Exception):
    pass


def _stop_after_first_epoch(trainer) -> None:
    if trainer.state.epoch == 1:
        raise _Stop


def test_start_slim_trains_fixed_widths_and_resumes(tmp_path: Path, fmnist) -> None:
    from lapp_edge.errors import UserError
    from lapp_edge.training.trainer import Trainer
    from tests.conftest import tiny_config

    config = tiny_config(tmp_path / "run", epochs=2, train_subset=256, test_subset=200, bypass=False, flops_target=0.5)
    trainer = Trainer(config, dataset=fmnist)
    widths, ratio, _ = uniform_widths(trainer.cost, 0.5, 8, 8)
    by_site = {s.name: int(w) for s, w in zip(trainer.sites, widths)}
    trainer.start_slim(by_site)
    with pytest.raises(UserError, match="has not started"):
        trainer.start_slim(by_site)
    with pytest.raises(_Stop):                           # killed after its first epoch (checkpoint written)
        trainer.run(on_epoch=_stop_after_first_epoch)
    resumed = Trainer(config, dataset=fmnist)
    report = resumed.run(resume=True)
    assert [e["phase"] for e in report["epochs"]] == ["slim", "slim"]
    assert resumed.state.widths == by_site
    assert report["flops"]["ratio"] == pytest.approx(ratio)


def test_job_chains_keep_a_torch_pruning_seed_together_and_run_every_job_once() -> None:
    jobs = compare.plan_jobs(["dense", "uniform", "tp-l1", "tp-gn", "lapp"], [0.3, 0.5], [0, 1])
    chains = compare.job_chains(jobs)
    flat = [job for chain in chains for job in chain]
    assert sorted(flat, key=jobs.index) == jobs and len(flat) == len(set(flat))
    for chain in chains:
        if chain[0].method in compare.TP_METHODS:
            # one method and seed, every target, in plan order: the first trains the shared pretraining
            assert {(j.method, j.seed) for j in chain} == {(chain[0].method, chain[0].seed)}
            assert [j.target for j in chain] == [0.3, 0.5]
        else:
            assert len(chain) == 1
    assert len(chains[0]) == 2 and len(chains[-1]) == 1       # longest first


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["tp-bn", "tp-gn"])
def test_sparsity_regularizer_traces_a_model_on_the_gpu(method: str) -> None:
    """On a GPU every tp-bn/tp-gn run failed: the traced example input stayed on the CPU."""
    pytest.importorskip("torch_pruning", reason="the Torch-Pruning methods need torch_pruning")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the Torch-Pruning regularizer on a GPU model was NOT run")
    model = build_model("resnet20", 1, 10, False, False).cuda()
    regularize = compare.sparsity_regularizer(method, model, (1, 28, 28))
    model(torch.randn(4, 1, 28, 28, device="cuda")).sum().backward()
    regularize()
    assert all(p.grad is None or p.grad.is_cuda for p in model.parameters())


@pytest.mark.parametrize("method", ["tp-bn", "tp-gn"])
def test_sparsity_regularizer_changes_the_gradients_it_should(method: str) -> None:
    pytest.importorskip("torch_pruning", reason="the Torch-Pruning methods need torch_pruning")
    model = build_model("resnet20", 1, 10, False, False)
    regularize = compare.sparsity_regularizer(method, model, (1, 28, 28))
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    before = model.stem.bn.weight.grad.clone()
    regularize()
    assert not torch.equal(model.stem.bn.weight.grad, before)


def test_a_worker_keeps_the_callers_python_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the GPU machine the caller's PYTHONPATH held torch_pruning: a worker that replaced it failed."""
    seen: dict[str, str] = {}

    def fake_run(command, stdout, stderr, env, preexec_fn):  # noqa: ANN001
        seen.update(env)
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setenv("PYTHONPATH", "/opt/site-extra")
    monkeypatch.setattr(compare.CHILDREN, "run", fake_run)
    args = compare.build_parser().parse_args(["--out", str(tmp_path)])
    assert compare.run_one(compare.Job("uniform", 0.5, 0), args) == 0
    assert seen["PYTHONPATH"].split(":") == [str(REPO), "/opt/site-extra"]


def test_latency_cache_counts_compiles_and_old_entries_count_as_one():
    cache = {"runs/a": {"ratio": 0.5}, "runs/b": {"ratio": 0.5, "compiles": 3}}
    assert compare.compiles_measured(cache, "runs/missing") == 0
    assert compare.compiles_measured(cache, "runs/a") == 1         # written before compiles were counted: re-measured at 3
    assert compare.compiles_measured(cache, "runs/b") == 3


@pytest.mark.parametrize("value", ["0", "-2"])
def test_compiles_below_one_is_refused_before_any_work(value, tmp_path, capsys):
    out = tmp_path / "out"
    assert compare.main(["--out", str(out), "--compiles", value, "--no-train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compiles" in err[0]
    assert not out.exists()
