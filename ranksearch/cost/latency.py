"""Latency measured on the device the model runs on, through ``torch.utils.benchmark``.

:func:`measure_latency` warms the model up, then times it with ``Timer.blocked_autorange`` at a
fixed thread count under ``torch.inference_mode`` and reports the median over the timed blocks and
their spread (interquartile range over median). When the spread says the machine was noisy it
measures again, up to ``max_attempts`` times, and keeps the quietest attempt. On CUDA the clock is
read from CUDA events after a synchronisation, so asynchronous kernels are timed in full.

For a device ranksearch cannot reach (a phone, an accelerator behind a server), pass
``latency_fn(model, example_inputs) -> ms``; it is then called instead of the local timer.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils import benchmark
from torch.utils._pytree import tree_map

from ..exceptions import DeviceUnavailableError, EvaluationError, InvalidInputsError
from ..layers import as_input_tuple, check_module
from .._modes import eval_mode

if TYPE_CHECKING:
    from .timing_process import TimingProcess

__all__ = ["LatencyMeasurement", "LatencyRatio", "LatencyFn", "measure_latency", "measure_ratio", "resolve_device",
           "model_device"]

log = logging.getLogger("ranksearch.cost")

#: ``latency_fn(model, example_inputs) -> milliseconds``, for devices timed outside this process.
LatencyFn = Callable[[nn.Module, Any], float]

# Fewer timed blocks than this make the interquartile range meaningless, so more blocks are
# timed until there are at least this many.
_MIN_BLOCKS = 5

#: the longest warm-up before the timed blocks, in seconds (at least two calls; at most half the
#: blocks' time); Timer.blocked_autorange runs the model again while it sizes its blocks. At 0.1 s
#: the warm-up was a quarter of each of a search's timings. A plan's ratio to the original, over 40
#: interleaved rounds with 0.1 s and 0.03 s (the benchmark's CNN and MiniLM at batch 1 and 8, a
#: fresh copy of each model per timing): medians within 0.2-0.8% of each other; interquartile
#: ranges 1.9/2.1% and 1.9/1.8% (CNN), 3.2/1.6% and 3.4/1.8% (MiniLM); each timing 13-22% shorter.
_WARM_UP_S = 0.03

#: the shortest block of calls :func:`measure_ratio` times one model for before switching to the other:
#: long enough that reading the clock costs nothing, short enough that both models of a pair run in
#: the same moment of a machine whose speed swings within a second
_PAIR_BLOCK_S = 0.01


@dataclass(frozen=True)
class LatencyMeasurement:
    """The latency of one forward pass.

    Attributes:
        ms: median over the timed blocks, in milliseconds per forward pass.
        spread: relative spread of the blocks, ``iqr_ms / ms`` (0.05 means the middle half of the
            blocks lie within 5% of the median's size).
        iqr_ms: interquartile range of the blocks, in milliseconds.
        runs: number of timed blocks (``latency_fn`` calls when one was given).
        device: ``"cpu"``, ``"cuda:0"``..., or ``"custom"`` when ``latency_fn`` did the timing.
        threads: the torch intra-op thread count used for the timing.
        attempts: how many times the measurement was taken (more than one when the first was noisy).
    """

    ms: float
    spread: float
    iqr_ms: float
    runs: int
    device: str
    threads: int
    attempts: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LatencyRatio:
    """How long a model takes relative to a reference, timed in alternating blocks (:func:`measure_ratio`).

    Attributes:
        ratio: the median over pairs of the model's block time over the reference's.
        chunk_ratios: the same median over each consecutive part of the pairs (``chunks`` of them):
            how much the answer moves within one measurement.
        reference_ms, model_ms: median milliseconds per forward pass, each in alternation with the other.
        pairs: blocks timed per model.
        device, threads: as in :class:`LatencyMeasurement`.
    """

    ratio: float
    chunk_ratios: tuple[float, ...]
    reference_ms: float
    model_ms: float
    pairs: int
    device: str
    threads: int

    @property
    def low(self) -> float:
        return min(self.chunk_ratios)

    @property
    def high(self) -> float:
        return max(self.chunk_ratios)

    @property
    def spread(self) -> float:
        """Range of the chunk ratios over the ratio."""
        return (self.high - self.low) / self.ratio

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return dataclasses.asdict(self)


# --- devices ------------------------------------------------------------------------------------


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None, model: nn.Module | None = None) -> torch.device:
    """Check that ``device`` exists on this machine and return it with its index filled in.

    ``None`` means the device ``model`` is on (CPU without a model).

    Raises:
        DeviceUnavailableError: for an unknown device name or one this machine does not have.
    """
    if device is None:
        device = model_device(model) if model is not None else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise DeviceUnavailableError(
            f"{device!r} is not a device name torch knows; use 'cpu', 'cuda' or 'cuda:0', or pass "
            "latency_fn to time the model on a device reached another way"
        ) from exc
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "meta":
        raise DeviceUnavailableError("the 'meta' device holds no data and cannot be timed; use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                "without CUDA" if torch.version.cuda is None
                else f"with CUDA {torch.version.cuda}, but no GPU is visible"
            )
            raise DeviceUnavailableError(
                f"device {str(device)!r} is not available: this torch ({torch.__version__}) was built {build}; "
                "use device='cpu', or pass latency_fn to time the model on a GPU reached another way"
            )
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceUnavailableError(
                f"device {str(device)!r} is not available: this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1})"
            )
        return torch.device("cuda", index)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailableError(
            f"device {str(device)!r} is not available on this machine; use device='cpu'"
        )
    try:  # any other backend: ask torch whether it can allocate there
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as exc:
        raise DeviceUnavailableError(
            f"device {str(device)!r} is not available on this machine ({exc}); use device='cpu'"
        ) from exc
    return dev


def _on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself when all its tensors are on ``device``, else a copy moved there.

    The caller's model is never moved: moving it in place would change what they own.
    """
    tensors = (*model.parameters(), *model.buffers())
    if all(t.device == device for t in tensors):
        return model
    log.debug("timing a copy of the model on %s (the model itself stays where it is)", device)
    return copy.deepcopy(model).to(device)


def _inputs_on(example_inputs: Any, device: torch.device) -> tuple[Any, ...]:
    inputs = as_input_tuple(example_inputs)
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) and x.device != device else x, inputs)


# --- modes and threads --------------------------------------------------------------------------


@contextlib.contextmanager
def _num_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _CudaEventClock:
    """A clock in seconds read from CUDA events, for ``benchmark.Timer(timer=...)``.

    Each reading records an event on the current stream and waits for it, so the interval
    between two readings covers every kernel launched in between.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device
        with torch.cuda.device(device):
            self._origin = torch.cuda.Event(enable_timing=True)
            self._origin.record()

    def __call__(self) -> float:
        with torch.cuda.device(self._device):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            event.synchronize()
        return self._origin.elapsed_time(event) / 1e3


def _clock(clock: str | Callable[[], float], device: torch.device, threads: int) -> Callable[[], float]:
    if callable(clock):
        return clock
    if clock == "cpu":
        if device.type != "cpu" or threads != 1:
            raise InvalidInputsError(
                f"clock='cpu' measures the CPU time of one thread: use it with device='cpu' and threads=1 "
                f"(got device={str(device)!r}, threads={threads}), or use clock='wall'"
            )
        return time.thread_time
    if clock != "wall":
        raise InvalidInputsError(f"clock must be 'wall', 'cpu' or a callable returning seconds, got {clock!r}")
    if device.type == "cpu":
        return time.perf_counter  # nothing to synchronise; torch's default would sync any GPU present
    if device.type == "cuda":
        return _CudaEventClock(device)
    return benchmark.utils.timer.timer  # synchronises torch's current accelerator


# --- validation ---------------------------------------------------------------------------------


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputsError(f"{what} must be a positive int, got {value!r}")
    return value


def _positive_float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidInputsError(f"{what} must be a positive number, got {value!r}")
    return float(value)


def _check_latency(value: Any) -> float:
    """A ``latency_fn`` result as a float, or :class:`EvaluationError`."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise EvaluationError(
            f"latency_fn must return the latency in milliseconds as a finite positive number, got {value!r}"
        )
    return float(value)


# --- one attempt --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Attempt:
    ms: float
    iqr_ms: float
    runs: int

    @property
    def spread(self) -> float:
        return self.iqr_ms / self.ms if self.ms > 0 else math.inf


def _warm_up(model: nn.Module, inputs: tuple[Any, ...], clock: Callable[[], float], seconds: float) -> float:
    """Run ``model`` for about ``seconds`` (at least two calls): the first calls allocate, pick kernels
    and fill caches. Returns the seconds per call it took."""
    start, calls = clock(), 0
    while calls < 2 or (clock() - start < seconds and calls < 1000):
        model(*inputs)
        calls += 1
    return max(clock() - start, 0.0) / calls


@contextlib.contextmanager
def _inputs_checked() -> Iterator[None]:
    """Local timing: a model that raises on the example inputs is reported as bad inputs
    (``InvalidInputsError``), except when the device ran out of memory (the inputs are not wrong)."""
    try:
        yield
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        raise InvalidInputsError(
            f"the model rejected the example inputs while being timed ({type(exc).__name__}: {exc}); "
            "pass inputs of the shape, dtype and device the model expects"
        ) from exc


def _check_timing_process(timing_process: Any, method: str, device: str | torch.device | None,
                          model: nn.Module) -> None:
    """A ``timing_process`` argument must be a TimingProcess (it has ``method``) timing on the CPU."""
    if not callable(getattr(timing_process, method, None)):
        raise InvalidInputsError("timing_process must be a ranksearch.cost.TimingProcess")
    if resolve_device(device, model).type != "cpu":
        raise InvalidInputsError("timing_process times on the CPU; for another device leave it out")


def _time_locally(
    model: nn.Module, inputs: tuple[Any, ...], *, threads: int, min_run_time: float, clock: Callable[[], float]
) -> _Attempt:
    with _num_threads(threads):
        per_call = _warm_up(model, inputs, clock, min(_WARM_UP_S, min_run_time / 2))
    timer = benchmark.Timer(
        stmt="model(*inputs)", globals={"model": model, "inputs": inputs}, num_threads=threads, timer=clock,
    )
    measurement = timer.blocked_autorange(min_run_time=max(min_run_time, _MIN_BLOCKS * per_call))
    times = list(measurement.times)
    block_s = float(np.mean(measurement.raw_times))
    for _ in range(_MIN_BLOCKS):  # blocks grow 10x at a time, so a few long ones may not be enough
        if len(times) >= _MIN_BLOCKS:
            break
        times += timer.blocked_autorange(min_run_time=(_MIN_BLOCKS - len(times)) * block_s).times
    p25, median, p75 = np.percentile(times, [25, 50, 75])  # as Measurement.median / .iqr compute them
    return _Attempt(ms=float(median) * 1e3, iqr_ms=float(p75 - p25) * 1e3, runs=len(times))


def _time_pairs_locally(
    reference: nn.Module, model: nn.Module, inputs: tuple[Any, ...], *, threads: int, seconds: float,
    chunks: int, clock: Callable[[], float],
) -> tuple[np.ndarray, np.ndarray]:
    """Block times (seconds per call) of ``reference`` and ``model``, alternating block by block.

    Each pair times one block of each, in turn first (ABBA...), so that neither model always runs
    just after the other; a block is as many calls as the reference needs for ``_PAIR_BLOCK_S``.
    """
    with _num_threads(threads):
        per_call = _warm_up(reference, inputs, clock, _WARM_UP_S)
        _warm_up(model, inputs, clock, _WARM_UP_S)
        calls = min(1000, math.ceil(_PAIR_BLOCK_S / per_call)) if per_call > 0 else 1000
        times: dict[int, list[float]] = {0: [], 1: []}
        nets = (reference, model)
        ends = time.perf_counter() + seconds
        while time.perf_counter() < ends or len(times[0]) < 2 * chunks:
            order = (0, 1) if len(times[0]) % 2 == 0 else (1, 0)
            for which in order:
                net = nets[which]
                start = clock()
                for _ in range(calls):
                    net(*inputs)
                times[which].append((clock() - start) / calls)
    return np.asarray(times[0]), np.asarray(times[1])


def _time_with_fn(model: nn.Module, example_inputs: Any, latency_fn: LatencyFn, calls: int) -> _Attempt:
    values = []
    for _ in range(calls):
        try:
            result = latency_fn(model, example_inputs)
        except Exception as exc:  # the user's function: re-raised with where it came from
            raise EvaluationError(f"latency_fn raised {type(exc).__name__}: {exc}") from exc
        values.append(_check_latency(result))
    p25, median, p75 = np.percentile(values, [25, 50, 75])
    return _Attempt(ms=float(median), iqr_ms=float(p75 - p25), runs=len(values))


# --- public entry point -------------------------------------------------------------------------


def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    device: str | torch.device | None = None,
    *,
    threads: int | None = None,
    min_run_time: float = 0.2,
    max_spread: float = 0.10,
    max_attempts: int = 3,
    latency_fn: LatencyFn | None = None,
    fn_calls: int = 3,
    clock: str | Callable[[], float] = "wall",
    timing_process: TimingProcess | None = None,
) -> LatencyMeasurement:
    """Median latency of one forward pass of ``model`` on ``example_inputs``, and its spread.

    The model is timed in eval mode under ``torch.inference_mode`` with a fixed thread count;
    every submodule's train/eval mode is restored afterwards. The model is never moved: if
    ``device`` differs from where it lives, a copy is timed there (inputs are copied too).

    Args:
        model: the model to time.
        example_inputs: a tensor or a tuple of positional arguments for ``model``.
        device: where to time it; ``None`` means where the model is. Ignored with ``latency_fn``
            (the function decides where the model runs).
        threads: torch intra-op threads during the timing; default ``torch.get_num_threads()`` now.
        min_run_time: seconds of timed blocks per attempt (stretched for slow models so that at
            least 5 blocks are timed).
        max_spread: an attempt whose spread (IQR / median) exceeds this is repeated.
        max_attempts: most attempts; the one with the smallest spread is kept.
        latency_fn: ``latency_fn(model, example_inputs) -> ms`` to time on a remote device;
            called ``fn_calls`` times per attempt and the median kept.
        fn_calls: calls of ``latency_fn`` per attempt.
        clock: ``"wall"`` (default): elapsed time, synchronised with the device (CUDA events on
            CUDA). ``"cpu"``: CPU time of the timing thread, CPU only and with ``threads=1``;
            on a machine shared with other work it leaves out the time the process waits for a
            core, which wall time counts. Or a callable returning seconds (tests, special
            hardware).
        timing_process: a :class:`~ranksearch.cost.TimingProcess` to time in: a fresh process on this
            CPU, whose heap the caller's work has not fragmented (see ``ranksearch.cost.timing_process``).
            The model's parameters and buffers are moved into shared memory (values unchanged).

    Returns:
        A :class:`LatencyMeasurement` (``.ms``, ``.spread``, ``.runs``...).

    Raises:
        DeviceUnavailableError: if ``device`` does not exist on this machine.
        InvalidInputsError: if the options are out of range or the model rejects the inputs.
        EvaluationError: if ``latency_fn`` raises or returns something that is not a finite
            positive number.

    Example:
        >>> m = ranksearch.cost.measure_latency(model, torch.randn(1, 3, 32, 32), threads=1)
        >>> print(f"{m.ms:.2f} ms +- {m.spread:.0%}")
    """
    check_module(model)
    threads = _positive_int(torch.get_num_threads() if threads is None else threads, "threads")
    max_attempts = _positive_int(max_attempts, "max_attempts")
    max_spread = _positive_float(max_spread, "max_spread")
    min_run_time = _positive_float(min_run_time, "min_run_time")
    fn_calls = _positive_int(fn_calls, "fn_calls")

    if timing_process is not None:
        if latency_fn is not None:
            raise InvalidInputsError("timing_process times on this machine's CPU: it cannot be combined with latency_fn")
        _check_timing_process(timing_process, "measure", device, model)
        return timing_process.measure(model, as_input_tuple(example_inputs), {
            "threads": threads, "min_run_time": min_run_time, "max_spread": max_spread,
            "max_attempts": max_attempts, "clock": clock})

    if latency_fn is not None:
        device_name = "custom"
        target = model

        def attempt() -> _Attempt:
            return _time_with_fn(model, example_inputs, latency_fn, fn_calls)
    else:
        dev = resolve_device(device, model)
        device_name = str(dev)
        target = _on_device(model, dev)
        inputs = _inputs_on(example_inputs, dev)
        timer_clock = _clock(clock, dev, threads)

        def attempt() -> _Attempt:
            with _inputs_checked():
                return _time_locally(target, inputs, threads=threads, min_run_time=min_run_time, clock=timer_clock)

    best: _Attempt | None = None
    attempts = 0
    # local timing runs without autograd; latency_fn gets the caller's grad mode (it may export the model)
    grad_mode = torch.inference_mode() if latency_fn is None else contextlib.nullcontext()
    with eval_mode(target), grad_mode:
        for attempts in range(1, max_attempts + 1):  # noqa: B007  (attempts is reported)
            result = attempt()
            if best is None or result.spread < best.spread:
                best = result
            if result.spread <= max_spread:
                break
            log.debug("latency spread %.1f%% > %.1f%%: measuring again", 100 * result.spread, 100 * max_spread)
    assert best is not None  # max_attempts >= 1
    if best.spread > max_spread:
        log.info(
            "latency measurement stayed noisy after %d attempts (spread %.1f%% > %.1f%%); the machine is busy",
            attempts, 100 * best.spread, 100 * max_spread,
        )
    return LatencyMeasurement(
        ms=best.ms, spread=best.spread, iqr_ms=best.iqr_ms, runs=best.runs, device=device_name,
        threads=threads, attempts=attempts,
    )


def measure_ratio(
    reference: nn.Module,
    model: nn.Module,
    example_inputs: Any,
    device: str | torch.device | None = None,
    *,
    threads: int | None = None,
    seconds: float = 1.0,
    chunks: int = 5,
    clock: str | Callable[[], float] = "wall",
    timing_process: TimingProcess | None = None,
) -> LatencyRatio:
    """``model``'s latency relative to ``reference``'s, the two timed in alternating blocks.

    Two models timed one after the other each catch their own moment of the machine, and on a shared
    machine those differ: on a 2-core cloud CPU whose speed swings by 20% within a second, the ratio of
    a decomposed CNN to its original from five alternating 0.1 s timings of each ranged over 0.69-0.77
    in six repeats (5.5 s each); alternating blocks of about 10 ms for half that time ranged over
    0.71-0.74. Both blocks of a pair run in the same moment, so their ratio cancels the machine's
    speed then, and the median over pairs drops the pairs a swing fell between.

    Args:
        reference, model: the two models (eval mode and ``torch.inference_mode`` while timed; modes
            restored).
        example_inputs: a tensor or a tuple of positional arguments both models take.
        device, threads, clock, timing_process: as in :func:`measure_latency` (no ``latency_fn``: a
            device reached through one cannot alternate two models within a call).
        seconds: how long to alternate, at least ``2 * chunks`` pairs.
        chunks: consecutive parts of the pairs whose own ratios say how much the answer moves.

    Returns:
        A :class:`LatencyRatio` (``.ratio``, ``.spread``, ``.reference_ms``, ``.model_ms``).

    Raises:
        DeviceUnavailableError, InvalidInputsError: as :func:`measure_latency`.
    """
    check_module(reference)
    check_module(model)
    threads = _positive_int(torch.get_num_threads() if threads is None else threads, "threads")
    seconds = _positive_float(seconds, "seconds")
    chunks = _positive_int(chunks, "chunks")
    if timing_process is not None:
        _check_timing_process(timing_process, "measure_ratio", device, model)
        return timing_process.measure_ratio(reference, model, as_input_tuple(example_inputs), {
            "threads": threads, "seconds": seconds, "chunks": chunks, "clock": clock})

    dev = resolve_device(device, model)
    first, second = _on_device(reference, dev), _on_device(model, dev)
    inputs = _inputs_on(example_inputs, dev)
    with _inputs_checked(), eval_mode(first), eval_mode(second), torch.inference_mode():
        ref_s, model_s = _time_pairs_locally(first, second, inputs, threads=threads, seconds=seconds,
                                             chunks=chunks, clock=_clock(clock, dev, threads))
    per_pair = model_s / ref_s  # a pair's two blocks ran in the same moment: their ratio cancels its speed
    return LatencyRatio(
        ratio=float(np.median(per_pair)),
        chunk_ratios=tuple(float(np.median(part)) for part in np.array_split(per_pair, chunks) if len(part)),
        reference_ms=float(np.median(ref_s)) * 1e3, model_ms=float(np.median(model_s)) * 1e3,
        pairs=len(ref_s), device=str(dev), threads=threads,
    )
