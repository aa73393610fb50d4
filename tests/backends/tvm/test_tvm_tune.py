"""Knobs of the TVM backend and tune_op (Optuna over schedule knobs, timing real kernels)."""
import pytest

from lmforge.backends.tvm import KNOBS, OpInstance, TVMBackend, tune_op
from lmforge.errors import UnsupportedOpError
from lmforge.passes.base import Knob


def test_knobs_are_well_formed():
    names = [k.name for k in TVMBackend.knobs()]
    assert len(names) == len(set(names)) == len(KNOBS)
    for k in TVMBackend.knobs():
        assert isinstance(k, Knob) and k.name.startswith("tvm.") and k.doc
        assert k.default in k.choices, k.name


def test_config_drives_the_schedule(randn, single_op_graph):
    node = single_op_graph("matmul", [randn(40, 24), randn(24, 32)]).nodes[0]
    default_mr = next(k.default for k in KNOBS if k.name == "tvm.gemm.mr")
    assert f"mr={default_mr}" in TVMBackend().claim(node, "cpu").detail
    assert "mr=2" in TVMBackend({"tvm.gemm.mr": 2, "unrelated.knob": 1}).claim(node, "cpu").detail


def test_tune_op_keeps_the_fastest_measured_config(randn):
    """With a scripted measure (the 3rd trial is fastest) the result is that trial's config; trial 0 is the
    default config."""
    times = iter([5e-3, 4e-3, 1e-3, 3e-3, 2e-3])

    def scripted(fn):
        fn()
        return next(times)

    inst = OpInstance.make("matmul", [randn(16, 32, seed=1), randn(32, 24, seed=2)])
    result = tune_op(inst, trials=5, measure=scripted, seed=3)
    defaults = {k.name: k.default for k in KNOBS}
    assert all(result.trials[0]["config"][k] == defaults[k] for k in result.trials[0]["config"])
    assert result.best_seconds == 1e-3 and result.best_config == result.trials[2]["config"]
    assert result.default_seconds == 5e-3 and result.speedup == pytest.approx(5.0)
    assert "defaults" in result.table()


def test_tune_op_times_real_kernels(randn):
    inst = OpInstance.make("linear", [randn(1, 1, 64, seed=4), randn(48, 64, seed=5), None])
    result = tune_op(inst, trials=3, seed=0)
    assert all(t["seconds"] > 0 for t in result.trials)
    assert result.best_seconds <= result.default_seconds
    assert all(name.startswith(("tvm.gemv.", "tvm.linear.")) for name in result.best_config)


def test_failed_builds_are_failed_trials(monkeypatch, randn):
    from lmforge.backends.tvm import schedule_cpu

    real = schedule_cpu.gemm

    default_mr = next(k.default for k in KNOBS if k.name == "tvm.gemm.mr")

    def flaky(sch, info, knobs):
        if knobs["tvm.gemm.mr"] != default_mr:
            raise RuntimeError("this tile does not build")
        return real(sch, info, knobs)

    monkeypatch.setattr(schedule_cpu, "gemm", flaky)
    inst = OpInstance.make("matmul", [randn(30, 16, seed=6), randn(16, 16, seed=7)])
    with pytest.warns(UserWarning):
        result = tune_op(inst, trials=6, measure=lambda fn: (fn(), 1e-3)[1], seed=1)
    failed = [t for t in result.trials if t["seconds"] is None]
    assert failed and all("build failed" in t["error"] for t in failed)
    assert result.best_config["tvm.gemm.mr"] == default_mr


def test_nothing_to_tune_for_unlowered_ops(randn):
    inst = OpInstance.make("linear", [randn(2, 8).double(), randn(4, 8).double(), None])
    with pytest.raises(UnsupportedOpError, match="no lowering"):
        tune_op(inst, trials=2)
