"""measure_latency: what it reports, when it repeats, what it leaves alone. Nothing here asserts
that anything is fast or slow; the noisy and quiet cases run on fake clocks."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from torch import nn

from ranksearch.cost import LatencyMeasurement, measure_latency, measure_ratio
from ranksearch.cost.latency import resolve_device
from ranksearch.exceptions import DeviceUnavailableError, EvaluationError, InvalidInputsError


class FakeClock:
    """Seconds that pass only when the fake model runs, by the durations it is given."""

    def __init__(self, durations: Iterator[float]) -> None:
        self.now = 0.0
        self.durations = durations

    def __call__(self) -> float:
        return self.now


class FakeModel(nn.Module):
    """Advances a fake clock on each call, and records the conditions it was called under."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.fc = nn.Linear(2, 2)
        self.seen: set[tuple[bool, bool, int]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += next(self.clock.durations)
        self.seen.add((self.training, torch.is_inference_mode_enabled(), torch.get_num_threads()))
        return x


def _fake(durations: Iterator[float]) -> tuple[FakeModel, FakeClock]:
    clock = FakeClock(durations)
    return FakeModel(clock), clock


def test_quiet_clock_gives_exact_median_and_one_attempt() -> None:
    model, clock = _fake(itertools.repeat(0.002))
    m = measure_latency(model, torch.zeros(1, 2), clock=clock, min_run_time=0.05, threads=1)
    assert isinstance(m, LatencyMeasurement)
    assert m.ms == pytest.approx(2.0)
    assert m.spread == pytest.approx(0.0, abs=1e-9) and m.iqr_ms == pytest.approx(0.0, abs=1e-9)
    assert m.attempts == 1 and m.runs >= 5
    assert (m.device, m.threads) == ("cpu", 1)


def test_noisy_clock_is_measured_again_and_spread_reported() -> None:
    rng = np.random.default_rng(0)
    model, clock = _fake(iter(lambda: float(rng.uniform(0.001, 0.004)), None))
    m = measure_latency(model, torch.zeros(1, 2), clock=clock, min_run_time=0.05, max_spread=0.05, max_attempts=3)
    assert m.attempts == 3  # every attempt was noisier than 5%
    assert m.spread > 0.05
    assert m.spread == pytest.approx(m.iqr_ms / m.ms)
    assert 1.0 < m.ms < 4.0


def test_times_in_eval_mode_inference_mode_and_given_threads_then_restores() -> None:
    model, clock = _fake(itertools.repeat(0.001))
    model.train()
    model.fc.eval()  # mixed modes must come back as they were
    threads_before = torch.get_num_threads()
    measure_latency(model, torch.zeros(1, 2), clock=clock, min_run_time=0.01, threads=1)
    assert model.seen == {(False, True, 1)}
    assert model.training and not model.fc.training
    assert torch.get_num_threads() == threads_before


def test_default_thread_count_is_the_current_one() -> None:
    model, clock = _fake(itertools.repeat(0.001))
    m = measure_latency(model, torch.zeros(1, 2), clock=clock, min_run_time=0.01)
    assert m.threads == torch.get_num_threads()


def test_real_timing_reports_structure() -> None:
    m = measure_latency(nn.Linear(8, 4), torch.randn(2, 8), min_run_time=0.01, threads=1)
    assert m.ms > 0 and math.isfinite(m.ms)
    assert m.spread >= 0 and m.iqr_ms >= 0 and m.runs >= 5 and 1 <= m.attempts <= 3
    assert m.to_dict() == {
        "ms": m.ms, "spread": m.spread, "iqr_ms": m.iqr_ms, "runs": m.runs, "device": "cpu", "threads": 1,
        "attempts": m.attempts,
    }


def test_cpu_clock_runs_and_needs_one_thread() -> None:
    m = measure_latency(nn.Linear(8, 4), torch.randn(2, 8), min_run_time=0.01, threads=1, clock="cpu")
    assert m.ms > 0
    with pytest.raises(InvalidInputsError, match="threads=1"):
        measure_latency(nn.Linear(8, 4), torch.randn(2, 8), threads=2, clock="cpu")
    with pytest.raises(InvalidInputsError, match="clock"):
        measure_latency(nn.Linear(8, 4), torch.randn(2, 8), clock="sundial")


def test_model_on_the_device_is_timed_itself_not_copied() -> None:
    model, clock = _fake(itertools.repeat(0.001))
    measure_latency(model, torch.zeros(1, 2), "cpu", clock=clock, min_run_time=0.01)
    assert model.seen  # the calls reached this very object
    assert model.fc.weight.device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_unavailable_cuda_raises_device_unavailable(device: str) -> None:
    with pytest.raises(DeviceUnavailableError, match="not available.*device='cpu'"):
        measure_latency(nn.Linear(2, 2), torch.zeros(1, 2), device)


@pytest.mark.parametrize("device", ["tpu7", "meta", f"cuda:{torch.cuda.device_count() + 3}"])
def test_unknown_or_missing_device_raises(device: str) -> None:
    with pytest.raises(DeviceUnavailableError):
        resolve_device(device)


def test_latency_fn_is_called_and_its_median_kept() -> None:
    calls = []

    def latency_fn(model: nn.Module, inputs: torch.Tensor) -> float:
        calls.append((model, inputs))
        return [3.0, 1.0, 2.0][len(calls) - 1]

    model, x = nn.Linear(2, 2), torch.zeros(1, 2)
    m = measure_latency(model, x, latency_fn=latency_fn, max_spread=1.0)
    assert len(calls) == 3 and all(c[0] is model and c[1] is x for c in calls)
    assert (m.ms, m.runs, m.device, m.attempts) == (2.0, 3, "custom", 1)
    assert m.iqr_ms == pytest.approx(1.0) and m.spread == pytest.approx(0.5)


def test_noisy_latency_fn_keeps_the_quietest_attempt() -> None:
    values = iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 3.0, 9.0])  # spreads 0.5, 0.2, 1.33

    m = measure_latency(nn.Linear(2, 2), torch.zeros(1, 2), latency_fn=lambda *_: next(values),
                        max_spread=0.1, max_attempts=3)
    assert m.attempts == 3
    assert m.ms == 5.0 and m.spread == pytest.approx(0.2)


def test_quiet_latency_fn_stops_after_one_attempt() -> None:
    calls = []
    m = measure_latency(nn.Linear(2, 2), torch.zeros(1, 2), latency_fn=lambda *_: calls.append(1) or 4.0,
                        max_attempts=3, fn_calls=5)
    assert len(calls) == 5 and m.attempts == 1 and m.spread == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0, "3", None, True, torch.ones(2)])
def test_latency_fn_bad_return_raises_evaluation_error(bad: object) -> None:
    with pytest.raises(EvaluationError, match="finite positive"):
        measure_latency(nn.Linear(2, 2), torch.zeros(1, 2), latency_fn=lambda *_: bad)


def test_latency_fn_numpy_and_tensor_scalars_are_accepted() -> None:
    assert measure_latency(nn.Linear(2, 2), torch.zeros(1, 2), latency_fn=lambda *_: np.float32(2.5)).ms == 2.5
    assert measure_latency(nn.Linear(2, 2), torch.zeros(1, 2), latency_fn=lambda *_: torch.tensor(1.5)).ms == 1.5


def test_latency_fn_that_raises_is_wrapped() -> None:
    def broken(model: nn.Module, inputs: torch.Tensor) -> float:
        raise ConnectionError("phone unplugged")

    with pytest.raises(EvaluationError, match="phone unplugged"):
        measure_latency(nn.Linear(2, 2), torch.zeros(1, 2), latency_fn=broken)


@pytest.mark.parametrize(
    "option", [{"threads": 0}, {"max_attempts": 0}, {"min_run_time": -1.0}, {"max_spread": float("nan")},
               {"fn_calls": 0}, {"threads": True}],
)
def test_bad_options_raise(option: dict[str, object]) -> None:
    with pytest.raises(InvalidInputsError):
        measure_latency(nn.Linear(2, 2), torch.zeros(1, 2), **option)  # type: ignore[arg-type]


def test_model_rejecting_inputs_raises_invalid_inputs() -> None:
    with pytest.raises(InvalidInputsError, match="rejected the example inputs"):
        measure_latency(nn.Linear(2, 2), torch.zeros(1, 5), min_run_time=0.01)


# --- measure_ratio --------------------------------------------------------------------------------


class MachineClock(FakeClock):
    """A machine whose speed changes as it runs: each model's call takes its own base duration times the
    machine's slowdown at that call (``slowdown(calls so far, of either model)``)."""

    def __init__(self, slowdown: Callable[[int], float]) -> None:
        super().__init__(iter(()))
        self.calls, self.slowdown = 0, slowdown

    def run(self, base: float) -> None:
        self.now += base * self.slowdown(self.calls)
        self.calls += 1


class MachineModel(FakeModel):
    def __init__(self, clock: MachineClock, base: float, name: str = "") -> None:
        super().__init__(clock)
        self.base, self.name = base, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.run(self.base)  # type: ignore[attr-defined]
        self.seen.add((self.training, torch.is_inference_mode_enabled(), torch.get_num_threads()))
        return x


@pytest.mark.parametrize("slowdown", [
    lambda calls: 3.0 if (calls // 7) % 2 else 1.0,  # swings 3x every 7 calls
    lambda calls: 1.0 + calls / 100,  # slows down steadily
], ids=["swinging", "slowing"])
def test_measure_ratio_cancels_a_machine_whose_speed_changes(slowdown: Callable[[int], float]) -> None:
    clock = MachineClock(slowdown)
    reference, model = MachineModel(clock, 1.0), MachineModel(clock, 0.5)
    paired = measure_ratio(reference, model, torch.zeros(1, 2), clock=clock, seconds=0.05, chunks=5, threads=1)
    # the two blocks of a pair run in (nearly) the same moment of the machine: their ratio is the models'
    assert paired.ratio == pytest.approx(0.5, rel=0.02)
    assert len(paired.chunk_ratios) == 5 and paired.pairs >= 10
    assert paired.low <= paired.ratio <= paired.high
    assert paired.spread == pytest.approx((paired.high - paired.low) / paired.ratio)


def test_measure_ratio_alternates_which_model_goes_first_and_restores_modes() -> None:
    order: list[str] = []
    clock = MachineClock(lambda calls: 1.0)

    class Logged(MachineModel):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            order.append(self.name)
            return super().forward(x)

    reference, model = Logged(clock, 0.002, "a").train(), Logged(clock, 0.002, "b").train()
    paired = measure_ratio(reference, model, torch.zeros(1, 2), clock=clock, seconds=0.01, chunks=2, threads=1)
    assert paired.ratio == pytest.approx(1.0) and paired.reference_ms == pytest.approx(2.0)
    # warm-ups, then blocks of 5 calls (10 ms at 2 ms a call) in the order ab ba ab ba...: runs of 10 calls
    runs = [(name, len(list(calls))) for name, calls in itertools.groupby(order)]
    assert runs[2] == ("a", 5)  # after the warm-ups: a's first block, then the pairs meet back to back
    pairs = runs[3:-1]
    assert pairs and all(length == 10 for _, length in pairs)
    assert reference.training and model.training  # modes restored
    assert reference.seen == model.seen == {(False, True, 1)}


def test_measure_ratio_rejects_inputs_the_models_refuse_and_bad_options() -> None:
    with pytest.raises(InvalidInputsError, match="rejected the example inputs"):
        measure_ratio(nn.Linear(2, 2), nn.Linear(2, 2), torch.zeros(1, 5), seconds=0.01)
    with pytest.raises(InvalidInputsError):
        measure_ratio(nn.Linear(2, 2), nn.Linear(2, 2), torch.zeros(1, 2), seconds=0)
    with pytest.raises(InvalidInputsError):
        measure_ratio(nn.Linear(2, 2), nn.Linear(2, 2), torch.zeros(1, 2), chunks=0)
