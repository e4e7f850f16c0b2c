from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import ranksearch
from ranksearch import CompressionPlan, LayerChoice

from .models import SharedLinear, SmallCNN, small_cnn_inputs


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _plan(model: nn.Module) -> CompressionPlan:
    return CompressionPlan.for_model(
        model,
        [LayerChoice("features.0", "channel", 4), LayerChoice("features.3", "spatial", 8),
         LayerChoice("features.5", "svd", 8), LayerChoice("head.1", "svd", 16)],
    )


def test_apply_plan_leaves_the_original_untouched() -> None:
    model = SmallCNN().train()
    before = _state(model)
    compressed = ranksearch.apply_plan(model, _plan(model))
    assert model.training and compressed.training
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.features[0], nn.Conv2d)
    assert isinstance(compressed.features[0], nn.Sequential)
    x = small_cnn_inputs()
    assert compressed.eval()(x).shape == model.eval()(x).shape


def test_full_rank_plan_reproduces_the_model() -> None:
    model = SmallCNN().eval()
    plan = CompressionPlan.for_model(model, [LayerChoice("features.0", "channel", 9), LayerChoice("head.3", "svd", 10)])
    x = small_cnn_inputs()
    with torch.no_grad():
        assert torch.allclose(ranksearch.apply_plan(model, plan)(x), model(x), atol=1e-5)


def test_state_dict_round_trip_through_structure_only_rebuild() -> None:
    model = SmallCNN().eval()
    plan = _plan(model)
    compressed = ranksearch.apply_plan(model, plan).eval()
    buffer = io.BytesIO()
    torch.save(compressed.state_dict(), buffer)
    buffer.seek(0)
    skeleton = ranksearch.apply_plan(model, plan, load_weights=False).eval()
    skeleton.load_state_dict(torch.load(buffer, weights_only=True))
    x = small_cnn_inputs()
    with torch.no_grad():
        assert torch.equal(skeleton(x), compressed(x))


def test_rebuilt_model_exports() -> None:
    model = SmallCNN().eval()
    compressed = ranksearch.apply_plan(model, _plan(model)).eval()
    x = small_cnn_inputs()
    exported = torch.export.export(compressed, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), compressed(x), atol=1e-5)


def test_shared_module_is_replaced_everywhere_once() -> None:
    model = SharedLinear()
    plan = CompressionPlan.for_model(model, [LayerChoice("proj", "svd", 16)])
    compressed = ranksearch.apply_plan(model, plan)
    assert compressed.proj is compressed.again
    assert isinstance(compressed.proj, nn.Sequential)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.allclose(compressed(x), model(x), atol=1e-5)


def test_invalid_choices_fail_before_anything_is_built() -> None:
    model = SmallCNN()
    with pytest.raises(ranksearch.UnsupportedLayerError, match="depthwise"):
        ranksearch.apply_plan(model, CompressionPlan.for_model(model, [LayerChoice("features.7", "channel", 2)]))
    with pytest.raises(ranksearch.InvalidRankError):
        ranksearch.apply_plan(model, CompressionPlan.for_model(model, [LayerChoice("head.3", "svd", 11)]))
    with pytest.raises(ranksearch.UnknownMethodError, match="svd"):
        ranksearch.apply_plan(model, CompressionPlan.for_model(model, [LayerChoice("head.3", "bogus", 2)]))
    with pytest.raises(ranksearch.PlanMismatchError, match="BatchNorm2d"):
        ranksearch.apply_plan(model, CompressionPlan.for_model(model, [LayerChoice("features.1", "svd", 2)]))


def test_nan_weights_are_refused() -> None:
    model = SmallCNN()
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.head[1].weight[0, 0] = float("nan")
    with pytest.raises(ranksearch.InvalidWeightsError, match="head.1"):
        ranksearch.apply_plan(broken, CompressionPlan.for_model(broken, [LayerChoice("head.1", "svd", 4)]))


def test_kept_layers_and_empty_plan() -> None:
    model = SmallCNN().eval()
    plan = CompressionPlan.for_model(model, [LayerChoice("features.7", "keep", reason="depthwise")])
    compressed = ranksearch.apply_plan(model, plan)
    assert compressed is not model
    x = small_cnn_inputs()
    with torch.no_grad():
        assert torch.equal(compressed(x), model(x))
    assert plan.summary() == "empty plan: every layer is kept"


def test_half_precision_layers_stay_half() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).half()
    plan = CompressionPlan.for_model(model, [LayerChoice("0", "svd", 8)])
    compressed = ranksearch.apply_plan(model, plan)
    assert all(p.dtype == torch.float16 for p in compressed.parameters())
