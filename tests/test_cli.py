"""The ``ranksearch`` command line, driven as a user drives it.

The main flows (optimize; report from a storage) run the installed ``ranksearch`` script and
``python -m ranksearch`` in a subprocess. The worker, apply and the many
error cases call ``ranksearch.cli.main(argv)`` - the function the script runs - in this process,
so that the file stays fast (each subprocess pays seconds of imports); they check the exit status
and the one-line message on stderr just the same.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

import ranksearch
from ranksearch.cli import build_parser, main
from ranksearch.cost import count_flops
from ranksearch.model_io import export_program, load_compressed, load_model
from ranksearch.plan import CompressionPlan
from tests import cli_factory
from tests.models import SmallCNN, small_cnn_inputs

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("ranksearch")
FACTORY = "tests.cli_factory:mlp"
MODEL_ARGS = [FACTORY, "--input-shape", "4,32", "--target-flops", "0.5", "--search-space", "transformer",
              "--eval-fn", "tests.cli_factory:agreement", "--no-progress", "--threads", "1"]


def _run(*args: str, module: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the installed script (or ``python -m ranksearch``) from the repository root."""
    command = [sys.executable, "-m", "ranksearch"] if module or not SCRIPT.exists() else [str(SCRIPT)]
    return subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits by itself for usage errors and --help
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def optimized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One `ranksearch optimize` run with a SQLite storage, shared by the tests below (read-only)."""
    root = tmp_path_factory.mktemp("cli")
    out, db = root / "out", root / "studies" / "mlp.db"
    proc = _run("optimize", *MODEL_ARGS, "--trials", "5", "--seed", "0", "--storage", str(db),
                "--study-name", "mlp", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return {"out": out, "db": db, "proc": proc}


# --- the main flows, in subprocesses ------------------------------------------------------------


def test_optimize_writes_plan_model_export_and_report(optimized) -> None:
    out, proc = optimized["out"], optimized["proc"]
    assert "Traceback" not in proc.stderr and "| FLOPs (multiply-adds) |" in proc.stdout
    plan = CompressionPlan.load(out / "plan.json")
    baseline, final = plan.metadata["baseline"], plan.metadata["final"]
    assert len(plan) >= 1 and final["flops"] <= 0.5 * baseline["flops"]

    x = torch.randn(4, cli_factory.IN_FEATURES)
    expected = ranksearch.apply_plan(cli_factory.mlp(), plan).eval()
    compressed = load_compressed(out / "compressed.pt", factory=FACTORY)
    exported = torch.export.load(str(out / "compressed.pt2")).module()
    with torch.no_grad():
        assert torch.allclose(compressed(x), expected(x), atol=1e-6)
        assert torch.allclose(exported(x), expected(x), atol=1e-5)
    assert count_flops(compressed, x) == final["flops"]

    report = (out / "report.md").read_text()
    for choice in plan.replaced:
        assert f"| `{choice.name}` |" in report
    for figure in ("pareto.png", "layers.png", "history.png"):
        assert f"]({figure})" in report
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_optimize_with_a_fine_tune_saves_the_fine_tuned_model(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code, stdout, err = _main(["optimize", *MODEL_ARGS, "--trials", "6", "--seed", "0", "--out", str(out),
                               "--finetune-fn", "tests.cli_factory:distill", "--finetune-candidates", "2",
                               "--no-export"], capsys)
    assert code == 0, err
    plan = CompressionPlan.load(out / "plan.json")
    tuned = plan.metadata["fine_tune"]
    assert len(tuned["candidates"]) == 2 and tuned["chosen_trial"] == plan.metadata["trial"]
    assert tuned["fine_tuned"] is True  # the distillation raises agreement well above every plan's before it
    chosen = next(c for c in tuned["candidates"] if c["trial"] == tuned["chosen_trial"])
    assert chosen["score_after"] == max(c["score_after"] for c in tuned["candidates"])
    # compressed.pt holds the fine-tuned weights; the plan alone rebuilds the model before fine-tuning
    compressed = load_compressed(out / "compressed.pt", factory=FACTORY)
    rebuilt = ranksearch.apply_plan(cli_factory.mlp(), plan).eval()
    assert cli_factory.agreement(compressed) == chosen["score_after"] == plan.metadata["final"]["score"]
    assert cli_factory.agreement(rebuilt) == chosen["score"]
    x = torch.randn(4, cli_factory.IN_FEATURES)
    with torch.no_grad():
        assert not torch.allclose(compressed(x), rebuilt(x))
    assert "fine-tuned 2 verified plans" in stdout


def test_optimize_writes_the_answer_s_headroom_spares_as_plans_to_apply(tmp_path, capsys, monkeypatch) -> None:
    """Under a latency target the answer sits at (FLOPs as ms, so the search is the same every run),
    'ranksearch optimize' writes each of the answer's headroom spares as a plan file, says so, and
    'ranksearch apply' rebuilds the model from one."""
    import ranksearch.cli

    x = torch.randn(4, cli_factory.IN_FEATURES)
    result = ranksearch.optimize(cli_factory.mlp(), x, target_latency_ratio=0.8, n_trials=10, seed=0,
                                 latency_fn=lambda m, inputs: count_flops(m, inputs) / 1e6,
                                 eval_fn=cli_factory.agreement, search_space="transformer", sensitivity=False,
                                 show_progress_bar=False)
    spares = result.headroom_spares()
    assert spares  # the answer sits less than 5% under the target
    monkeypatch.setattr(ranksearch.cli, "_run_optimize", lambda args: (result, (x,)))
    out = tmp_path / "out"
    code, stdout, err = _main(["optimize", *MODEL_ARGS, "--out", str(out), "--no-export"], capsys)
    assert code == 0, err
    written = sorted(out.glob("spare_plan_*.json"))
    assert [p.name for p in written] == [f"spare_plan_{n}.json" for n in range(1, len(spares) + 1)]
    for path, spare in zip(written, spares, strict=True):
        plan = CompressionPlan.load(path)
        assert plan.to_dict()["layers"] == spare.plan.to_dict()["layers"]
        assert plan.metadata["headroom_spare_for"] == result.plan.metadata["trial"]
        assert plan.metadata["trial"] == spare.trial and plan.metadata["score"] == spare.score
        assert plan.metadata["latency_ms_in_its_trial"] < 0.8 * result.baseline.latency_ms
        assert str(path) in stdout and f"trial {spare.trial}," in stdout  # named, and listed in the summary
    assert spares[0].plan.metadata == {}  # the result's own plans are left as they were
    report = (out / "report.md").read_text()
    assert "headroom spares of this plan" in report and all(f"trial {p.trial}," in report for p in spares)

    code, stdout, err = _main(["apply", str(written[0]), FACTORY, "--out", str(tmp_path / "spare.pt")], capsys)
    assert code == 0, err
    spare_model = load_compressed(tmp_path / "spare.pt", factory=FACTORY)
    assert count_flops(spare_model, x) == spares[0].flops < result.final.flops


def test_the_study_stays_readable_by_optuna(optimized) -> None:
    study = optuna.load_study(study_name="mlp", storage=f"sqlite:///{optimized['db']}")
    assert len([t for t in study.trials if t.state.is_finished()]) == 5  # --trials is the study's total
    assert study.user_attrs["ranksearch"]["targets"]["flops"] > 0
    assert study.user_attrs["baseline"]["flops"] > 0
    finished = [t for t in study.trials if t.state.is_finished()]
    assert finished and all("plan" in t.user_attrs and "flops" in t.user_attrs for t in finished)
    assert study.best_trials  # multi-objective front computed by Optuna itself


def test_report_from_the_storage_and_the_plan(optimized, tmp_path) -> None:
    plan = CompressionPlan.load(optimized["out"] / "plan.json")
    proc = _run("report", "--storage", str(optimized["db"]), "--study-name", "mlp",
                "--plan", str(optimized["out"] / "plan.json"), "--out", str(tmp_path), module=True)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "report.md").read_text()
    assert "study 'mlp'" in text and f"Plan from trial {plan.metadata['trial']}." in text
    assert all((tmp_path / name).exists() for name in ("pareto.png", "layers.png", "history.png"))


def test_a_pickled_model_is_refused_without_trust(tmp_path, capsys) -> None:
    pickled = tmp_path / "model.pt"
    torch.save(cli_factory.mlp(), pickled)
    code, _, err = _main(["optimize", str(pickled), "--input-shape", "4,32", "--target-flops", "0.5"], capsys)
    assert code == 1
    line = _one_line(err)
    assert "runs code stored in the file" in line and "--trust-model-file" in line


# --- more errors and options, through main() in this process ------------------------------------


def test_worker_joins_the_study_and_runs_it_to_the_total(optimized, tmp_path, capsys) -> None:
    db = tmp_path / "shared.db"
    shutil.copy(optimized["db"], db)
    code, out, err = _main(["worker", *MODEL_ARGS, "--trials", "8", "--storage", str(db), "--study-name", "mlp"],
                           capsys)
    assert code == 0, err
    assert "has 8 finished trials" in out
    study = optuna.load_study(study_name="mlp", storage=f"sqlite:///{db}")
    assert len([t for t in study.trials if t.state.is_finished()]) == 8


def test_worker_refuses_a_missing_study_or_another_budget(optimized, tmp_path, capsys) -> None:
    db = tmp_path / "shared.db"
    shutil.copy(optimized["db"], db)
    code, _, err = _main(["worker", *MODEL_ARGS, "--storage", str(db), "--study-name", "other"], capsys)
    assert code == 1 and "no study 'other'" in _one_line(err) and "'mlp'" in err
    argv = ["worker", *MODEL_ARGS, "--storage", str(db), "--study-name", "mlp"]
    argv[argv.index("0.5")] = "0.4"
    code, _, err = _main(argv, capsys)
    assert code == 1 and "made for another budget" in _one_line(err)


def test_apply_a_plan_to_a_state_dict_and_export_it(optimized, tmp_path, capsys) -> None:
    weights = tmp_path / "weights.pt"
    torch.save(cli_factory.mlp().state_dict(), weights)
    target = tmp_path / "small.pt2"
    code, out, err = _main(["apply", str(optimized["out"] / "plan.json"), str(weights), "--factory",
                            "tests.cli_factory:untrained_mlp", "--input-shape", "4,32", "--out", str(target)], capsys)
    assert code == 0, err
    assert f"wrote {target}" in out
    plan = CompressionPlan.load(optimized["out"] / "plan.json")
    expected = ranksearch.apply_plan(cli_factory.mlp(), plan).eval()
    x = torch.randn(4, cli_factory.IN_FEATURES)
    with torch.no_grad():
        assert torch.allclose(torch.export.load(str(target)).module()(x), expected(x), atol=1e-5)


def test_a_trusted_pickled_model_loads(optimized, tmp_path, capsys) -> None:
    pickled = tmp_path / "model.pt"
    torch.save(cli_factory.mlp(), pickled)
    code, _, err = _main(["apply", str(optimized["out"] / "plan.json"), str(pickled), "--trust-model-file",
                            "--out", str(tmp_path / "small.pt")], capsys)
    assert code == 0, err
    model = load_compressed(tmp_path / "small.pt", factory=FACTORY)
    expected = ranksearch.apply_plan(cli_factory.mlp(), CompressionPlan.load(optimized["out"] / "plan.json")).eval()
    x = torch.randn(4, cli_factory.IN_FEATURES)
    with torch.no_grad():
        assert torch.allclose(model(x), expected(x), atol=1e-6)


def test_export_programs_load_with_their_standard_layers_back(tmp_path) -> None:
    model = SmallCNN().eval()  # strided, 1x1 and depthwise convs, batch norm, linear head
    x = small_cnn_inputs()
    export_program(model, (x,), tmp_path / "cnn.pt2")
    loaded = load_model(tmp_path / "cnn.pt2")
    original_specs = [spec.to_dict() for spec in ranksearch.capture_layer_specs(model, x)]
    assert [spec.to_dict() for spec in ranksearch.capture_layer_specs(loaded, x)] == original_specs
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_apply_a_plan_to_an_export_program(optimized, tmp_path, capsys) -> None:
    export_program(cli_factory.mlp(), (torch.randn(4, cli_factory.IN_FEATURES),), tmp_path / "mlp.pt2")
    target = tmp_path / "small.pt2"
    code, _, err = _main(["apply", str(optimized["out"] / "plan.json"), str(tmp_path / "mlp.pt2"),
                          "--input-shape", "4,32", "--out", str(target)], capsys)
    assert code == 0, err
    plan = CompressionPlan.load(optimized["out"] / "plan.json")
    expected = ranksearch.apply_plan(cli_factory.mlp(), plan).eval()
    x = torch.randn(4, cli_factory.IN_FEATURES)
    with torch.no_grad():
        assert torch.allclose(torch.export.load(str(target)).module()(x), expected(x), atol=1e-5)


def _corrupt_plan(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.json"
    path.write_text('{"layers": [{"name": "0", "method": "svd", "rank": ')
    return path


def _unknown_method_plan(tmp_path: Path) -> Path:
    path = tmp_path / "unknown.json"
    CompressionPlan.from_dict({"layers": [{"name": "0", "method": "wavelet", "rank": 4}]}).save(path)
    return path


def _state_dict(tmp_path: Path) -> Path:
    path = tmp_path / "weights.pt"
    torch.save(cli_factory.mlp().state_dict(), path)
    return path


@pytest.mark.parametrize(("argv", "code", "expected"), [
    (["optimize", FACTORY, "--input-shape", "4,32"], 2, "give at least one target"),
    (["optimize", FACTORY, "--input-shape", "4,32", "--target-latency-ratio", "1.5"], 1,
     "target_latency_ratio must be a fraction in (0, 1]"),
    (["optimize", FACTORY, "--input-shape", "4,32", "--target-latency-ratio", "0.5", "--target-latency-ms", "1"], 1,
     "not both"),
    (["optimize", FACTORY, "--input-shape", "4,32", "--target-latency-ratio", "0.5", "--latency-clock", "cpu"], 1,
     "pass threads=1"),
    (["optimize", FACTORY, "--input-shape", "4,32", "--target-latency-ratio", "0.5", "--latency-clock", "sun"], 2,
     "invalid choice: 'sun'"),
    (["optimize", FACTORY, "--input-shape", "4,32", "--target-flops", "0.5", "--finetune-fn",
      "tests.cli_factory:no_such_fn"], 1, "no_such_fn"),
    (["optimize", FACTORY, "--input-shape", "4,32", "--target-flops", "0.5", "--finetune-candidates", "0"], 2,
     "--finetune-candidates"),
    (["optimize", FACTORY, "--input-shape", "4,-2", "--target-flops", "0.5"], 2, "bad shape '4,-2'"),
    (["optimize", FACTORY, "--target-flops", "zero"], 2, "'zero' is not a number"),
    (["optimize", FACTORY, "--target-flops", "0.5", "--search-space", "nope"], 1, "unknown search space 'nope'"),
    (["optimize", FACTORY, "--target-flops", "0.5", "--storage", "x.db"], 2, "--storage needs --study-name"),
    (["optimize", "tests.cli_factory:not_a_module", "--target-flops", "0.5"], 1, "returned a int"),
    (["optimize", "tests.no_such_module:mlp", "--target-flops", "0.5"], 1, "cannot import module"),
    (["optimize", "missing.pt", "--target-flops", "0.5"], 1, "model file 'missing.pt' does not exist"),
    (["optimize", "{weights}", "--target-flops", "0.5"], 1, "pass --factory"),
    (["optimize", FACTORY, "--target-flops", "0.5", "--device", "tpu:9"], 1, "tpu:9"),
    (["apply", "{corrupt}", FACTORY, "--out", "{tmp}/m.pt"], 1, "is corrupt (not valid JSON"),
    (["apply", "{unknown}", FACTORY, "--out", "{tmp}/m.pt"], 1, "unknown decomposition method 'wavelet'"),
    (["apply", "{unknown}", FACTORY, "--out", "{tmp}/m.pt2"], 2, "needs example inputs"),
    (["optimize", FACTORY, "--target-flops", "0.5", "--inputs", "x.pt", "--input-shape", "4,32"], 2,
     "either --inputs or --input-shape"),
    (["optimize", FACTORY, "--target-flops", "0.5", "--input-shape", "4,32", "--input-dtype", "int8"], 2,
     "unknown dtype 'int8'"),
    (["optimize", FACTORY, "--target-flops", "0.5", "--inputs", "{tmp}/none.pt"], 1, "does not exist"),
    (["report", "--out", "{tmp}"], 2, "give --plan FILE, or --storage URL"),
    (["report", "--storage", "{tmp}/none.db", "--study-name", "s", "--out", "{tmp}"], 1, "does not exist"),
    (["worker", FACTORY, "--target-flops", "0.5"], 2, "the following arguments are required: --storage"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
])
def test_errors_are_one_line_with_the_right_exit_status(argv, code, expected, tmp_path, capsys) -> None:
    files = {"corrupt": _corrupt_plan(tmp_path), "unknown": _unknown_method_plan(tmp_path),
             "weights": _state_dict(tmp_path), "tmp": tmp_path}
    argv = [arg.format(**files) for arg in argv]
    got, _, err = _main(argv, capsys)
    assert got == code
    line = _one_line(err)
    assert expected in line
    assert line.startswith("ranksearch")


def test_debug_shows_the_traceback(tmp_path) -> None:
    with pytest.raises(ranksearch.PlanError):
        main(["apply", str(_corrupt_plan(tmp_path)), FACTORY, "--out", str(tmp_path / "m.pt"), "--debug"])


def test_spaces_and_methods_list_what_is_shipped_and_registered(capsys) -> None:
    code, out, _ = _main(["spaces"], capsys)
    assert code == 0
    for name in ranksearch.list_spaces():
        assert f"{name}\n    {ranksearch.load_space(name).description}" in out
    code, out, _ = _main(["methods"], capsys)
    assert code == 0
    for name in ranksearch.methods():
        method = ranksearch.get_method(name)
        assert any(line.startswith(name) and ", ".join(method.kinds) in line for line in out.splitlines())
        assert method.summary.split()[0] in out


def test_every_option_of_every_command_has_help(capsys) -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"optimize", "worker", "apply", "report", "spaces", "methods"}
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
        code, out, _ = _main([name, "--help"], capsys)
        assert code == 0
        for action in sub._actions:
            for option in action.option_strings:
                assert option in out


def test_timing_process_flag_reaches_the_search(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    seen: dict[str, object] = {}

    def optimize(*args: object, **kwargs: object) -> None:
        seen.update(kwargs)
        raise ranksearch.InvalidInputsError("stopped before the search")

    monkeypatch.setattr(ranksearch.search, "optimize", optimize)
    base = ["optimize", FACTORY, "--input-shape", "4,32", "--target-flops", "0.5"]
    for flags, expected in (([], False), (["--timing-process"], True)):
        code, _, err = _main([*base, *flags], capsys)
        assert code != 0 and "stopped before the search" in err and seen["timing_process"] is expected


def test_batchnorm_statistics_re_estimated_in_the_search_are_re_estimated_by_apply(tmp_path, capsys) -> None:
    """'ranksearch optimize --calib-data' re-estimates BatchNorm statistics and records it in the plan;
    'ranksearch apply' with the same --calib-data rebuilds the saved model, and warns without it."""
    calib = tmp_path / "calib.pt"
    torch.save(cli_factory.bn_cnn_calib(), calib)
    out = tmp_path / "out"
    common = ["tests.cli_factory:bn_cnn", "--input-shape", "2,1,8,8", "--target-flops", "0.4", "--trials", "4",
              "--search-space", "convnet", "--no-progress", "--threads", "1", "--calib-data", str(calib)]
    code, _, err = _main(["optimize", *common, "--out", str(out), "--no-export"], capsys)
    assert code == 0, err
    recorded = CompressionPlan.load(out / "plan.json").metadata["batchnorm_recalibration"]
    assert recorded["calibration_items"] == 128 and recorded["layers"]
    saved = load_compressed(out / "compressed.pt", factory="tests.cli_factory:bn_cnn").state_dict()

    code, _, err = _main(["apply", str(out / "plan.json"), "tests.cli_factory:bn_cnn", "--calib-data", str(calib),
                          "--out", str(tmp_path / "again.pt")], capsys)
    assert code == 0, err
    again = load_compressed(tmp_path / "again.pt", factory="tests.cli_factory:bn_cnn").state_dict()
    assert all(torch.equal(value, again[name]) for name, value in saved.items())

    code, _, err = _main(["apply", str(out / "plan.json"), "tests.cli_factory:bn_cnn",
                          "--out", str(tmp_path / "bare.pt")], capsys)
    assert code == 0 and "pass the same --calib-data" in err
    bare = load_compressed(tmp_path / "bare.pt", factory="tests.cli_factory:bn_cnn").state_dict()
    original = cli_factory.bn_cnn().state_dict()
    name = f"{recorded['layers'][0]}.running_mean"
    assert torch.equal(bare[name], original[name]) and not torch.equal(saved[name], original[name])

    code, _, err = _main(["optimize", *common, "--out", str(tmp_path / "off"), "--no-export",
                          "--batchnorm-recalibration", "off"], capsys)
    assert code == 0, err
    assert "batchnorm_recalibration" not in CompressionPlan.load(tmp_path / "off" / "plan.json").metadata
