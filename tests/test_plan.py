from __future__ import annotations

import json

import pytest
import torch

import ranksearch
from ranksearch import CompressionPlan, LayerChoice, PlanError, PlanMismatchError

from .models import SmallCNN


def _plan(model: torch.nn.Module) -> CompressionPlan:
    return CompressionPlan.for_model(
        model,
        [
            LayerChoice("features.0", "channel", 4, origin="seed:vbmf"),
            LayerChoice("head.1", "svd", 8, origin="trial:3"),
            LayerChoice("features.7", "keep", reason="depthwise"),
        ],
        metadata={"target_flops": 0.5},
    )


def test_round_trip_through_dict_and_file(tmp_path) -> None:
    model = SmallCNN()
    plan = _plan(model)
    assert CompressionPlan.from_dict(plan.to_dict()) == plan
    path = plan.save(tmp_path / "sub" / "plan.json")
    loaded = CompressionPlan.load(path)
    assert loaded == plan
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1
    assert data["layers"][0] == {"name": "features.0", "method": "channel", "rank": 4, "origin": "seed:vbmf"}
    assert not list(tmp_path.glob("sub/.*tmp")), "no temporary file left behind"


def test_hand_written_plan_defaults() -> None:
    plan = CompressionPlan.from_dict({"layers": [{"name": "head.1", "method": "SVD", "rank": 8},
                                                 {"name": "x", "method": "tucker2", "rank": [2, 3]}]})
    assert plan.layers[0] == LayerChoice("head.1", "svd", 8, origin="user")
    assert plan.layers[1].rank == (2, 3)
    assert plan.fingerprint is None


@pytest.mark.parametrize(
    "data,match",
    [
        ({"schema_version": 99, "layers": []}, "schema version 99"),
        ({"layers": "nope"}, "'layers' list"),
        ([], "JSON object"),
        ({"layers": [{"method": "svd", "rank": 2}]}, "lacks 'name'"),
        ({"layers": [{"name": "a", "method": "svd"}]}, "needs a 'rank'"),
        ({"layers": [{"name": "a", "method": "svd", "rank": 0}]}, "positive int"),
        ({"layers": [{"name": "a", "method": "svd", "rank": 2.5}]}, "positive int"),
        ({"layers": [{"name": "a", "method": "svd", "rank": 2, "bogus": 1}]}, "unknown keys"),
        ({"layers": [{"name": "a", "method": "svd", "rank": 2}, {"name": "a", "method": "svd", "rank": 3}]}, "more than once"),
    ],
)
def test_malformed_plans_raise_clear_errors(data, match) -> None:
    with pytest.raises(PlanError, match=match):
        CompressionPlan.from_dict(data)


def test_corrupt_and_missing_files(tmp_path) -> None:
    path = tmp_path / "plan.json"
    path.write_text('{"layers": [')
    with pytest.raises(PlanError, match="corrupt"):
        CompressionPlan.load(path)
    with pytest.raises(PlanError, match="cannot read"):
        CompressionPlan.load(tmp_path / "missing.json")


def test_plan_for_another_model_names_first_mismatch() -> None:
    plan = _plan(SmallCNN())
    other = SmallCNN(classes=5)
    with pytest.raises(PlanMismatchError, match=r"head\.3"):
        ranksearch.apply_plan(other, plan)


def test_hand_written_plan_naming_a_missing_layer() -> None:
    plan = CompressionPlan.from_dict({"layers": [{"name": "nope.1", "method": "svd", "rank": 2}]})
    with pytest.raises(PlanMismatchError, match="nope.1"):
        ranksearch.apply_plan(SmallCNN(), plan)


def test_nothing_is_pickled(tmp_path) -> None:
    path = _plan(SmallCNN()).save(tmp_path / "plan.json")
    json.loads(path.read_text())  # plain JSON all the way down
