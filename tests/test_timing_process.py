"""TimingProcess: models timed in a fresh process, sent once while unchanged, errors that say what to
do, and nothing of the caller's moved or left running. Nothing here asserts that anything is fast."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
from torch import nn

import ranksearch
from ranksearch.cost import TimingProcess, measure_latency, measure_ratio
from ranksearch.exceptions import EvaluationError, InvalidInputsError

from .models import RefusesToRunIn, SmallCNN, small_cnn_inputs

QUICK = dict(threads=1, min_run_time=0.01, max_attempts=1)


@pytest.fixture(scope="module")
def worker() -> TimingProcess:
    with TimingProcess() as process:
        yield process


def test_a_model_is_timed_in_the_worker_not_here(worker: TimingProcess) -> None:
    model, x = RefusesToRunIn(os.getpid()), torch.randn(2, 8)
    measured = measure_latency(model, x, timing_process=worker, **QUICK)
    assert measured.ms > 0 and measured.device == "cpu" and measured.threads == 1
    with pytest.raises(InvalidInputsError, match="rejected the example inputs"):
        measure_latency(model, x, **QUICK)  # here, the same model refuses to run


def test_a_model_is_sent_once_while_it_is_unchanged(worker: TimingProcess) -> None:
    model, x = SmallCNN(), small_cnn_inputs()
    sent = worker.models_sent
    for _ in range(3):
        measure_latency(model, x, timing_process=worker, **QUICK)
    assert worker.models_sent == sent + 1
    model.head[1] = nn.Linear(32 * 4 * 4, 64)  # a swapped layer: the worker's copy is stale
    measure_latency(model, x, timing_process=worker, **QUICK)
    assert worker.models_sent == sent + 2
    with torch.no_grad():
        model.head[3].weight.mul_(0.5)  # an in-place update, too
    measure_latency(model, x, timing_process=worker, **QUICK)
    assert worker.models_sent == sent + 3
    model.features[7].stride = (2, 2)  # a setting: the worker's copy takes it too, and the head no longer fits
    with pytest.raises(InvalidInputsError, match="rejected the example inputs"):
        measure_latency(model, x, timing_process=worker, **QUICK)
    assert worker.models_sent == sent + 4
    model.train()  # the mode is not a setting: the worker times in eval mode either way
    model.features[7].stride = (1, 1)
    measure_latency(model, x, timing_process=worker, **QUICK)
    measure_latency(model.eval(), x, timing_process=worker, **QUICK)
    assert worker.models_sent == sent + 5


def test_the_callers_inputs_stay_as_they_are(worker: TimingProcess) -> None:
    x = small_cnn_inputs()
    measure_latency(SmallCNN(), x, timing_process=worker, **QUICK)
    assert not x.is_shared()
    x.resize_(4, 1, 8, 8)  # a shared storage could not grow


def test_errors_in_the_worker_come_back_as_they_would_here(worker: TimingProcess) -> None:
    with pytest.raises(InvalidInputsError, match="rejected the example inputs"):
        measure_latency(SmallCNN(), torch.randn(2, 3, 8, 8), timing_process=worker, **QUICK)
    assert worker.alive  # and it goes on timing
    assert measure_latency(SmallCNN(), small_cnn_inputs(), timing_process=worker, **QUICK).ms > 0


def test_a_model_the_worker_cannot_have_gets_an_error_that_says_what_to_do(worker: TimingProcess) -> None:
    class Local(nn.Linear):  # cannot be pickled: a local class
        pass

    with pytest.raises(InvalidInputsError, match="must be picklable"):
        measure_latency(Local(8, 8), torch.randn(2, 8), timing_process=worker, **QUICK)

    # importable here but not in a fresh interpreter: a module that exists only in this process
    module = types.ModuleType("ranksearch_test_only_here")
    exec("from torch import nn\nclass OnlyHere(nn.Linear):\n    pass\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        with pytest.raises(InvalidInputsError, match="must be importable by name"):
            measure_latency(module.OnlyHere(8, 8), torch.randn(2, 8), timing_process=worker, **QUICK)
    finally:
        del sys.modules[module.__name__]
    assert measure_latency(SmallCNN(), small_cnn_inputs(), timing_process=worker, **QUICK).ms > 0


def test_a_worker_that_died_is_reported_not_waited_for() -> None:
    process = TimingProcess()
    process._process.kill()
    process._process.wait()
    with pytest.raises(EvaluationError, match="has ended"):
        measure_latency(SmallCNN(), small_cnn_inputs(), timing_process=process, **QUICK)
    process.close()


def test_measure_latency_refuses_a_timing_process_with_a_latency_fn(worker: TimingProcess) -> None:
    with pytest.raises(InvalidInputsError, match="cannot be combined with latency_fn"):
        measure_latency(SmallCNN(), small_cnn_inputs(), timing_process=worker, latency_fn=lambda m, x: 1.0)


def test_a_search_times_in_its_own_worker_and_ends_it(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[TimingProcess] = []

    class Recorded(TimingProcess):
        def __init__(self) -> None:
            super().__init__()
            started.append(self)

    timed_here: list[type] = []
    time_locally = ranksearch.cost.latency._time_locally

    def recording(model: nn.Module, *args: object, **kwargs: object) -> object:
        timed_here.append(type(model))
        return time_locally(model, *args, **kwargs)

    monkeypatch.setattr(ranksearch.search, "TimingProcess", Recorded)
    monkeypatch.setattr(ranksearch.cost.latency, "_time_locally", recording)
    model, x = SmallCNN(), small_cnn_inputs()
    result = ranksearch.optimize(model, x, target_flops=0.6, n_trials=3, threads=1, latency_clock="cpu",
                                 seed=0, show_progress_bar=False, sensitivity=False, timing_process=True)
    assert result.baseline.latency_ms > 0 and result.final.latency_ms > 0 and len(result.plan)
    # the original and the answer were timed there, nothing here
    assert len(started) == 1 and started[0].models_sent >= 2 and not timed_here
    assert not started[0].alive  # ended with the search
    assert not any(t.is_shared() for t in (*model.parameters(), x))  # the caller's tensors stay where they were


def test_a_search_leaves_a_callers_worker_running(worker: TimingProcess) -> None:
    model, x = SmallCNN(), small_cnn_inputs()
    sent = worker.models_sent
    ranksearch.optimize(model, x, target_flops=0.6, n_trials=2, threads=1, seed=0, show_progress_bar=False,
                        sensitivity=False, timing_process=worker)
    assert worker.models_sent > sent
    assert worker.alive


@pytest.mark.parametrize("kwargs, message", [
    (dict(timing_process="yes"), "must be True, False or a ranksearch.cost.TimingProcess"),
    (dict(timing_process=True, latency_fn=lambda m, x: 1.0), "leave it out with latency_fn"),
])
def test_a_search_refuses_a_timing_process_it_cannot_use(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputsError, match=message):
        ranksearch.optimize(SmallCNN(), small_cnn_inputs(), target_latency_ratio=0.5, **kwargs)


def test_a_ratio_is_timed_in_the_worker_and_each_model_sent_once(worker: TimingProcess) -> None:
    reference, model, x = SmallCNN().eval(), SmallCNN().eval(), small_cnn_inputs()
    before = worker.models_sent
    first = measure_ratio(reference, model, x, threads=1, seconds=0.02, chunks=2, timing_process=worker)
    assert worker.models_sent == before + 2 and first.pairs >= 4 and first.ratio > 0
    measure_ratio(reference, model, x, threads=1, seconds=0.02, chunks=2, timing_process=worker)
    measure_latency(reference, x, timing_process=worker, **QUICK)  # known by the same token to both kinds
    assert worker.models_sent == before + 2
    # one model against itself: sent once
    same = SmallCNN().eval()
    measure_ratio(same, same, x, threads=1, seconds=0.02, chunks=2, timing_process=worker)
    assert worker.models_sent == before + 3


def test_a_ratio_whose_model_the_worker_let_go_is_sent_again(worker: TimingProcess) -> None:
    reference, x = SmallCNN().eval(), small_cnn_inputs()
    measure_ratio(reference, SmallCNN().eval(), x, threads=1, seconds=0.02, chunks=2, timing_process=worker)
    for _ in range(5):  # more models than the worker keeps: the reference is let go
        measure_latency(SmallCNN().eval(), x, timing_process=worker, **QUICK)
    before = worker.models_sent
    again = measure_ratio(reference, SmallCNN().eval(), x, threads=1, seconds=0.02, chunks=2, timing_process=worker)
    assert again.ratio > 0 and worker.models_sent == before + 2
