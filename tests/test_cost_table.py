"""LatencyTable: isolation timing, anchors and the monotone fit, and the JSON disk cache.

Timings come from a deterministic fake ``latency_fn`` (a function of the module's size), so the
tests check structure and bookkeeping, never speed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ranksearch
from ranksearch import capture_layer_specs, get_method
from ranksearch.cost import LatencyTable, count_params
from ranksearch.cost.table import default_cache_dir
from ranksearch.decompose import base
from ranksearch.decompose.base import DecompositionMethod, LayerCost, Rank
from ranksearch.exceptions import (
    InvalidInputsError, InvalidRankError, PlanMismatchError, UnknownMethodError, UnsupportedLayerError,
)

from ranksearch.layers import LayerSpec

from .models import SmallCNN, small_cnn_inputs


class FakeDevice:
    """``latency_fn``: 0.01 ms plus 1 ns per parameter; counts its calls and what it saw."""

    def __init__(self, wobble: float = 0.0) -> None:
        self.calls = 0
        self.wobble = wobble
        self.inputs: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, inputs: torch.Tensor) -> float:
        self.calls += 1
        self.inputs.append(inputs)
        params = count_params(module)
        # wobble: a deterministic non-monotone disturbance, like measurement noise
        return 0.01 + 1e-6 * params * (1.0 + self.wobble * math.sin(params))


class TwoTwins(nn.Module):
    """Two layers of identical configuration (and one different): the twins share timings."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.c = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _table(model: nn.Module, x: torch.Tensor, cache_dir: Path, fn: FakeDevice, **options: object) -> LatencyTable:
    return LatencyTable(model, x, capture_layer_specs(model, x), latency_fn=fn, cache_dir=cache_dir, **options)  # type: ignore[arg-type]


def _candidates(table: LatencyTable) -> dict[str, list[str]]:
    return {name: [m for m in ranksearch.methods() if get_method(m).supports(table.spec(name))] for name in table.names}


def test_original_and_replacements_are_timed_on_the_captured_input_shape(tmp_path: Path) -> None:
    model, x = SmallCNN(), small_cnn_inputs(batch=3)
    fn = FakeDevice()
    table = _table(model, x, tmp_path, fn)
    spec = table.spec("features.3")
    assert table.original_ms("features.3") == pytest.approx(0.01 + 1e-6 * spec.params)
    assert tuple(fn.inputs[-1].shape) == spec.input_shape
    table.layer_ms("features.3", "channel", 4)
    assert all(tuple(i.shape) == spec.input_shape for i in fn.inputs)


def test_embedding_layers_get_integer_inputs_in_range(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 4))
    x = torch.randint(0, 50, (2, 7))
    fn = FakeDevice()
    table = _table(model, x, tmp_path, fn)
    table.original_ms("0")
    ids = fn.inputs[-1]
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (2, 7) and 0 <= int(ids.min()) and int(ids.max()) < 50


def test_keep_is_the_original_and_saving_is_the_difference(tmp_path: Path) -> None:
    model, x = SmallCNN(), small_cnn_inputs()
    table = _table(model, x, tmp_path, FakeDevice())
    name = "head.1"
    assert table.layer_ms(name, "keep", None) == table.original_ms(name)
    assert table.saving_ms(name, "svd", 4) == pytest.approx(table.original_ms(name) - table.layer_ms(name, "svd", 4))
    assert table.saving_ms(name, "svd", 4) > 0  # the fake device charges per parameter


def test_anchors_span_smallest_to_break_even_rank(tmp_path: Path) -> None:
    model, x = SmallCNN(), small_cnn_inputs()
    table = _table(model, x, tmp_path, FakeDevice(), anchors=4)
    for name, methods in _candidates(table).items():
        spec = table.spec(name)
        for method in methods:
            m = get_method(method)
            ranks = table.anchor_ranks(name, method)
            assert ranks[0] == m.rank_from_scale(spec, 0.0)
            assert ranks[-1] == (m.break_even_rank(spec) or m.rank_from_scale(spec, 1.0))
            assert 1 <= len(ranks) <= 4 and len(set(map(str, ranks))) == len(ranks)
            points = table.measured_points(name, method)
            assert [p[0] for p in sorted(points, key=lambda p: p[1])] == sorted(ranks, key=lambda r: m.cost(spec, r).flops)


def test_fit_is_monotone_in_flops_across_every_rank_even_with_noise(tmp_path: Path) -> None:
    model, x = SmallCNN(), small_cnn_inputs()
    table = _table(model, x, tmp_path, FakeDevice(wobble=0.5))
    for name, methods in _candidates(table).items():
        spec = table.spec(name)
        for method in methods:
            m = get_method(method)
            ranks = {str(r): r for r in (m.rank_from_scale(spec, s) for s in np.linspace(0.0, 1.0, 25))}
            by_cost = sorted(ranks.values(), key=lambda r: (m.cost(spec, r).flops, m.cost(spec, r).params))
            latencies = [table.layer_ms(name, method, r) for r in by_cost]
            assert all(b >= a - 1e-12 for a, b in zip(latencies, latencies[1:])), (name, method)


def test_ranks_between_anchors_are_filled_without_measuring(tmp_path: Path) -> None:
    model, x = SmallCNN(), small_cnn_inputs()
    fn = FakeDevice()
    table = _table(model, x, tmp_path, fn, anchors=3)
    table.layer_ms("features.3", "channel", 1)
    measured = table.measurements
    assert measured == len(table.anchor_ranks("features.3", "channel"))  # the anchors, not the original
    low, high = table.anchor_ranks("features.3", "channel")[0], table.anchor_ranks("features.3", "channel")[-1]
    for rank in range(low, get_method("channel").rank_bounds(table.spec("features.3"))[1] + 1):
        table.layer_ms("features.3", "channel", rank)
    assert table.measurements == measured
    # the fake device is linear in parameters, and so in FLOPs here: interpolation is exact
    spec = table.spec("features.3")
    middle = (low + high) // 2
    params = get_method("channel").structure(spec, middle)
    assert table.layer_ms("features.3", "channel", middle) == pytest.approx(0.01 + 1e-6 * count_params(params))
    # above the break-even rank the fit is extended along its slope, still increasing
    top = get_method("channel").rank_bounds(spec)[1]
    if top > high:
        assert table.layer_ms("features.3", "channel", top) > table.layer_ms("features.3", "channel", high)


def test_latencies_are_remembered_per_layer_method_and_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = SmallCNN(), small_cnn_inputs()
    table = _table(model, x, tmp_path, FakeDevice(wobble=0.5))
    queries = [(name, method, get_method(method).rank_from_scale(table.spec(name), scale))
               for name, methods in _candidates(table).items() for method in methods for scale in (0.0, 0.5, 1.0)]
    queries += [(name, "keep", None) for name in table.names]
    first = [table.layer_ms(*q) for q in queries]
    assert len(set(first)) > len(table.names)  # different layers, methods and ranks: different answers
    fitted = []
    monkeypatch.setattr(ranksearch.cost.table._Fit, "__call__", lambda self, cost: fitted.append(cost) or 0.0)
    assert [table.layer_ms(*q) for q in reversed(queries)] == first[::-1]
    assert fitted == []  # answered from memory, not from the fit
    monkeypatch.undo()
    fresh = _table(model, x, tmp_path, FakeDevice(wobble=0.5))  # the same timings, from the disk cache
    assert [fresh.layer_ms(*q) for q in reversed(queries)] == first[::-1]
    assert fresh.measurements == 0


def test_second_table_on_same_model_measures_nothing(tmp_path: Path) -> None:
    model, x = SmallCNN(), small_cnn_inputs()
    first_fn = FakeDevice()
    first = _table(model, x, tmp_path, first_fn)
    first.prepare(_candidates(first))
    assert first.measurements > 0 and first_fn.calls >= first.measurements
    second_fn = FakeDevice()
    second = _table(model, x, tmp_path, second_fn)
    second.prepare(_candidates(second))
    for name, methods in _candidates(second).items():
        assert second.original_ms(name) == first.original_ms(name)
        for method in methods:
            rank = get_method(method).rank_from_scale(second.spec(name), 0.4)
            assert second.layer_ms(name, method, rank) == first.layer_ms(name, method, rank)
    assert second.measurements == 0 and second_fn.calls == 0


def test_cache_is_json_keyed_by_device_threads_and_shape(tmp_path: Path) -> None:
    model, x = SmallCNN(), small_cnn_inputs()
    table = _table(model, x, tmp_path, FakeDevice(), device_name="pixel-7")
    table.original_ms("head.1")
    files = list((tmp_path / "latency").glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["context"]["device"] == "custom:pixel-7"
    assert data["context"]["threads"] == table.threads and data["context"]["torch"] == torch.__version__
    (key,) = data["entries"]
    assert json.loads(key)["layer"]["input_shape"] == list(table.spec("head.1").input_shape)
    assert json.loads(key)["layer"]["dtype"] == "float32"

    def measurements(**options: object) -> int:
        other = _table(model, options.pop("x", x), tmp_path, FakeDevice(), **options)  # type: ignore[arg-type]
        other.original_ms("head.1")
        return other.measurements

    assert measurements(device_name="pixel-7") == 0
    assert measurements(device_name="pixel-8") == 1
    assert measurements(device_name="pixel-7", threads=table.threads + 1) == 1
    assert measurements(device_name="pixel-7", x=small_cnn_inputs(batch=5)) == 1  # another input shape


def test_layers_of_identical_configuration_share_measurements(tmp_path: Path) -> None:
    model, x = TwoTwins(), torch.randn(2, 32)
    table = _table(model, x, tmp_path, FakeDevice(), cache=False, anchors=3)
    table.prepare({"a": ["svd"], "b": ["svd"]})
    assert table.measurements == 1 + len(table.anchor_ranks("a", "svd"))
    assert table.layer_ms("a", "svd", 5) == table.layer_ms("b", "svd", 5)


def test_no_cache_writes_nothing(tmp_path: Path) -> None:
    model, x = TwoTwins(), torch.randn(2, 32)
    table = _table(model, x, tmp_path, FakeDevice(), cache=False)
    table.prepare({"c": ["svd"]})
    assert table.measurements > 0 and not (tmp_path / "latency").exists()


def test_corrupt_cache_is_ignored_and_rewritten(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, x = TwoTwins(), torch.randn(2, 32)
    table = _table(model, x, tmp_path, FakeDevice())
    table.original_ms("c")
    (path,) = (tmp_path / "latency").glob("*.json")
    path.write_text("{not json")
    again = _table(model, x, tmp_path, FakeDevice())
    assert again.original_ms("c") == table.original_ms("c") and again.measurements == 1
    assert "ignoring unreadable latency cache" in caplog.text
    assert json.loads(path.read_text())["entries"]


def test_default_cache_dir_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RANKSEARCH_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("RANKSEARCH_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "ranksearch"


def test_specs_without_input_shape_are_captured(tmp_path: Path) -> None:
    model, x = TwoTwins(), torch.randn(4, 32)
    bare = [ranksearch.layers.spec_from_module(name, model.get_submodule(name)) for name in ("a", "c")]
    table = LatencyTable(model, x, bare, latency_fn=FakeDevice(), cache_dir=tmp_path)
    assert table.spec("a").input_shape == (4, 32)


def test_local_timing_path_runs(tmp_path: Path) -> None:
    model, x = TwoTwins(), torch.randn(2, 32)
    table = LatencyTable(model, x, capture_layer_specs(model, x), threads=1, cache_dir=tmp_path,
                         anchors=2, min_run_time=0.005)
    assert table.original_ms("c") > 0 and table.layer_ms("c", "svd", 2) > 0
    assert table.context["device"].startswith("cpu:") and table.measurements == 3


def test_errors_name_what_is_wrong(tmp_path: Path) -> None:
    model, x = SmallCNN(), small_cnn_inputs()
    table = _table(model, x, tmp_path, FakeDevice())
    with pytest.raises(PlanMismatchError, match="not in this latency table"):
        table.original_ms("features.99")
    with pytest.raises(UnknownMethodError):
        table.layer_ms("head.1", "nope", 2)
    with pytest.raises(UnsupportedLayerError, match="depthwise"):
        table.layer_ms("features.7", "channel", 2)
    with pytest.raises(UnsupportedLayerError):
        table.prepare({"head.1": ["spatial"]})
    with pytest.raises(InvalidRankError):
        table.layer_ms("head.1", "svd", 10_000)
    with pytest.raises(InvalidInputsError):
        _table(model, x, tmp_path, FakeDevice(), anchors=1)


class _Bottleneck(DecompositionMethod):
    """A two-rank method for linear layers (in -> r1 -> r2 -> out), only for timing tests."""

    name = "bottleneck-test"
    kinds = ("linear",)
    rank_arity = 2

    def rank_bounds(self, spec: LayerSpec) -> tuple[Rank, Rank]:
        return (1, 1), (spec.in_features, spec.out_features)

    def rank_from_scale(self, spec: LayerSpec, scale: float) -> Rank:
        return (max(1, math.ceil(scale * spec.in_features)), max(1, math.ceil(scale * spec.out_features)))

    def cost(self, spec: LayerSpec, rank: Rank) -> LayerCost:
        r1, r2 = rank  # type: ignore[misc]
        per_position = spec.in_features * r1 + r1 * r2 + r2 * spec.out_features
        return LayerCost(flops=spec.positions * per_position, params=per_position)

    def structure(self, spec: LayerSpec, rank: Rank) -> nn.Module:
        r1, r2 = rank  # type: ignore[misc]
        return nn.Sequential(nn.Linear(spec.in_features, r1, bias=False), nn.Linear(r1, r2, bias=False),
                             nn.Linear(r2, spec.out_features, bias=False))

    def load_weights(self, replacement: nn.Module, layer: nn.Module, spec: LayerSpec, rank: Rank) -> None:
        raise NotImplementedError("timing only")


def test_tuple_ranks_are_anchored_and_fitted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(base._REGISTRY, _Bottleneck.name, _Bottleneck())
    model, x = TwoTwins(), torch.randn(2, 32)
    table = _table(model, x, tmp_path, FakeDevice(wobble=0.3), anchors=4)
    ranks = table.anchor_ranks("a", _Bottleneck.name)
    assert all(isinstance(r, tuple) and len(r) == 2 for r in ranks) and len(ranks) >= 2
    method = get_method(_Bottleneck.name)
    spec = table.spec("a")
    grid = sorted({(i, j) for i in range(1, 33, 3) for j in range(1, 33, 3)}, key=lambda r: method.cost(spec, r).flops)
    latencies = [table.layer_ms("a", _Bottleneck.name, r) for r in grid]
    assert all(b >= a - 1e-12 for a, b in zip(latencies, latencies[1:]))
    assert table.layer_ms("a", _Bottleneck.name, [4, 6]) == table.layer_ms("a", _Bottleneck.name, (4, 6))
    again = _table(model, x, tmp_path, FakeDevice(wobble=0.3), anchors=4)
    assert again.layer_ms("a", _Bottleneck.name, (4, 6)) == table.layer_ms("a", _Bottleneck.name, (4, 6))
    assert again.measurements == 0  # tuple ranks round-trip through the JSON cache keys
