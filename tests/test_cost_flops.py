"""FLOP and parameter counts (fvcore): per model, per module, unsupported operators, and the
analytic cost of a whole rebuilt model."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import ranksearch
from ranksearch import CompressionPlan, LayerChoice, apply_plan, capture_layer_specs, get_method
from ranksearch.cost import FLOP_CONVENTION, count_flops, count_params, flops_by_module
from ranksearch.cost import flops as flops_module
from ranksearch.exceptions import InvalidInputsError, NotAModuleError

from .models import SharedLinear, SmallCNN, small_cnn_inputs


@torch.library.custom_op("ranksearch_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _twice_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class WithUncountedOps(nn.Module):
    """A Linear followed by operators fvcore has no handle for (an FFT and a custom op)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(_twice(self.fc(x))).real


def test_one_multiply_add_is_one_flop() -> None:
    assert "multiply-add" in FLOP_CONVENTION
    assert count_flops(nn.Linear(8, 4), torch.randn(2, 8)) == 2 * 8 * 4
    conv = nn.Conv2d(3, 5, 3, padding=1)
    assert count_flops(conv, torch.randn(1, 3, 6, 6)) == 6 * 6 * 5 * 3 * 9


def test_flops_by_module_matches_layer_specs() -> None:
    model, x = SmallCNN(), small_cnn_inputs()
    by_module = flops_by_module(model, x)
    assert by_module[""] == count_flops(model, x)
    for spec in capture_layer_specs(model, x):
        assert by_module[spec.name] == spec.flops, spec.name


def test_count_params_counts_shared_weights_once() -> None:
    model = SharedLinear()
    assert count_params(model) == (16 * 16 + 16) + (16 * 4 + 4)
    assert count_params(model.proj.parameters()) == 16 * 16 + 16


def test_count_flops_leaves_train_mode_alone() -> None:
    model = SmallCNN().train()
    model.head.eval()
    count_flops(model, small_cnn_inputs())
    assert model.training and model.features.training and not model.head.training


def test_bad_arguments_raise_ranksearch_errors() -> None:
    with pytest.raises(NotAModuleError):
        count_flops("model.pt", torch.randn(1))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputsError):
        count_flops(nn.Linear(2, 2), None)


def test_unsupported_operators_are_listed_once_without_noise(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(flops_module, "_reported_unsupported", set())
    model, x = WithUncountedOps(), torch.randn(2, 8)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG, logger="ranksearch"):
        warnings.simplefilter("always")
        first = count_flops(model, x)
        second = count_flops(model, x)
        by_module = flops_by_module(model, x)
    assert first == second == by_module[""] == 2 * 8 * 6  # the uncounted ops add nothing
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("ranksearch")]
    assert len(messages) == 1, messages
    assert "aten::fft_rfft" in messages[0] and "ranksearch_test::twice" in messages[0]
    assert caught == []
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def _plan_for(model: nn.Module, x: torch.Tensor, method: str) -> CompressionPlan | None:
    """Every layer ``method`` supports, replaced at about half its largest rank."""
    m = get_method(method)
    choices = [
        LayerChoice(spec.name, method, m.rank_from_scale(spec, 0.5))
        for spec in capture_layer_specs(model, x)
        if m.supports(spec)
    ]
    return CompressionPlan.for_model(model, choices) if choices else None


class Mixed(nn.Module):
    """Linear layers on 3-d input, a strided 3x3 conv and a 1x1 conv: most methods apply somewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 12, 3, stride=2, padding=1)
        self.point = nn.Conv2d(12, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 24)
        self.out = nn.Linear(24, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.point(torch.relu(self.conv(x))).flatten(1)
        return self.out(torch.relu(self.fc(y)).unsqueeze(1).expand(-1, 3, -1))


@pytest.mark.parametrize("method", ranksearch.methods())
def test_sum_of_analytic_layer_costs_equals_fvcore_on_rebuilt_model(method: str) -> None:
    model, x = Mixed().eval(), torch.randn(2, 4, 8, 8)
    plan = _plan_for(model, x, method)
    if plan is None:
        pytest.skip(f"{method} applies to no layer of the test model")
    specs = {s.name: s for s in capture_layer_specs(model, x)}
    expected = count_flops(model, x)
    for choice in plan.replaced:
        spec = specs[choice.name]
        expected += get_method(method).cost(spec, choice.rank).flops - spec.flops  # type: ignore[arg-type]
    rebuilt = apply_plan(model, plan, load_weights=False)  # FLOPs do not depend on the weights
    assert count_flops(rebuilt, x) == expected
