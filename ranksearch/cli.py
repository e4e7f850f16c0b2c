"""The ``ranksearch`` command line: a thin layer over :func:`ranksearch.optimize` and friends.

::

    ranksearch optimize examples.digits_factory:trained_cnn --input-shape 1,1,16,16 --target-flops 0.5 \\
        --trials 40 --storage runs/digits.db --study-name digits --out runs/digits
    ranksearch report --storage runs/digits.db --study-name digits --out runs/digits-report
    ranksearch apply runs/digits/plan.json examples.digits_factory:trained_cnn --out small.pt
    ranksearch worker examples.digits_factory:trained_cnn ... --storage runs/digits.db --study-name digits
    ranksearch spaces
    ranksearch methods

Exit status: 0 on success, 1 when ranksearch refuses or fails (the message says why and what to
do), 2 for a command line it cannot parse, 130 when interrupted. Tracebacks only with ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import sys
import textwrap
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["build_parser", "main"]

log = logging.getLogger("ranksearch.cli")

_STORAGE_HELP = (
    "Optuna storage: a database URL (sqlite:///study.db, postgresql://...) or a plain path to a SQLite "
    "file (study.db)"
)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _UsageError(Exception):
    """A combination of options argparse cannot check by itself; reported like argparse's errors."""


# --- argument types -----------------------------------------------------------------------------


def _shape(text: str) -> tuple[int, ...]:
    from .model_io import parse_shape  # torch is imported only by the commands that need it

    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dtype(text: str) -> Any:
    from .model_io import parse_dtype

    try:
        return parse_dtype(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def _budget(text: str) -> float | int:
    """A FLOP / parameter budget: a fraction in (0, 1] of the original, or an absolute count above 1."""
    value = _positive_float(text)
    return value if value <= 1 else round(value)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _storage_url(text: str) -> str:
    """A database URL as given, or a plain path turned into a SQLite URL."""
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


# --- parser -------------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    # SUPPRESS keeps a subcommand's default from overwriting the same flag given before it
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more logging: -v for progress messages, -vv for debugging detail")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks on errors")
    return common


def _add_model(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "model", metavar="MODEL",
        help="the trained model: a module:callable factory (a callable with no arguments returning an "
             "nn.Module, e.g. examples.digits_factory:trained_cnn), or a saved file: a torch.export program "
             "(.pt2, loaded without running code from it), a state_dict (.pt, needs --factory) or a whole "
             "pickled module (torch.save(model), needs --trust-model-file)",
    )
    group.add_argument("--factory", metavar="MODULE:CALLABLE",
                       help="builds the model a state_dict file belongs to (the weights are then loaded into it)")
    group.add_argument(
        "--trust-model-file", action="store_true",
        help="allow loading a whole pickled module: unpickling runs code stored in the file, so only use it "
             "for files you trust; prefer a state_dict with --factory, or a .pt2 export program",
    )


def _add_inputs(parser: argparse.ArgumentParser, *, calibration: bool = True) -> None:
    group = parser.add_argument_group("inputs")
    group.add_argument(
        "--input-shape", metavar="SHAPE", type=_shape, action="append", default=[],
        help="shape of one positional model input, e.g. 1,3,32,32; repeat for several inputs. Random "
             "inputs are made: Gaussian floats, token ids below the smallest embedding's vocabulary for "
             "integer dtypes, all-True for bool",
    )
    group.add_argument("--input-dtype", metavar="DTYPE", type=_dtype, action="append", default=[],
                       help="dtype of the inputs (float32, int64, bool...): once for all, or once per "
                            "--input-shape (default float32)")
    group.add_argument("--inputs", metavar="FILE",
                       help="real example inputs instead: a tensor or a tuple of tensors saved with torch.save "
                            "(read weights-only)")
    if calibration:
        group.add_argument("--calib-data", metavar="FILE",
                           help="batches of real inputs: a list of tensors (or of tuples of tensors) saved with "
                                "torch.save. The built-in output fidelity is measured on them (default: the example "
                                "inputs plus noisy copies), and with 32 items or more BatchNorm statistics are "
                                "re-estimated on them (see --batchnorm-recalibration)")
        group.add_argument("--batchnorm-recalibration", choices=("auto", "on", "off"), default="auto",
                           help="re-estimate the statistics of the BatchNorm layers after each plan's first "
                                "decomposed layer on --calib-data before scoring it (no training; most of what a deep "
                                "cut costs a CNN comes back). auto (default): with 32 or more calibration items")
    else:
        group.add_argument("--calib-data", metavar="FILE",
                           help="the calibration batches the plan's search had (a list of tensors saved with "
                                "torch.save): a plan that records re-estimated BatchNorm statistics re-estimates "
                                "them on these; without them its model keeps the original's statistics")


def _add_search(parser: argparse.ArgumentParser, *, storage_required: bool) -> None:
    targets = parser.add_argument_group("targets (at least one)")
    targets.add_argument("--target-latency-ms", metavar="MS", type=_positive_float,
                         help="latency budget in milliseconds per forward pass on --device, measured")
    targets.add_argument("--target-latency-ratio", metavar="R", type=_positive_float,
                         help="latency budget as a fraction in (0, 1] of the original's latency, as the search "
                              "times it (0.5: twice as fast)")
    targets.add_argument("--target-flops", metavar="X", type=_budget,
                         help="FLOP budget: a fraction in (0, 1] of the original (0.5) or an absolute count of "
                              "multiply-adds (2e6)")
    targets.add_argument("--target-params", metavar="X", type=_budget,
                         help="parameter budget: a fraction in (0, 1] of the original or an absolute count")
    quality = parser.add_argument_group("quality")
    quality.add_argument("--eval-fn", metavar="MODULE:CALLABLE",
                         help="scores a candidate: callable(model) -> float, higher is better (e.g. validation "
                              "accuracy); default: output fidelity to the original on the calibration inputs")
    quality.add_argument("--finetune-fn", metavar="MODULE:CALLABLE",
                         help="the fine-tune the compressed model will get: callable(model), training it in place; "
                              "the best --finetune-candidates plans are fine-tuned and the best after fine-tuning "
                              "is kept (the saved model is then the fine-tuned one), unless no fine-tune scored "
                              "above the best plan as decomposed")
    quality.add_argument("--finetune-candidates", metavar="N", type=_positive_int,
                         help="how many verified plans --finetune-fn is tried on (default: optimize's, 4)")
    search = parser.add_argument_group("search")
    search.add_argument("--trials", metavar="N", type=_positive_int, default=100,
                        help="trials wanted in the study in total; a resumed or shared study runs only the "
                             "remainder (default 100)")
    search.add_argument("--timeout", metavar="SECONDS", type=_positive_float,
                        help="stop searching after this many seconds")
    search.add_argument("--search-space", metavar="NAME|FILE", default="default",
                        help="a shipped space (see 'ranksearch spaces') or a YAML file (default: default)")
    search.add_argument("--storage", metavar="URL", required=storage_required,
                        help=_STORAGE_HELP + "; makes the search resumable and shareable with workers")
    search.add_argument("--study-name", metavar="NAME", required=storage_required,
                        help="the study's name in --storage; rerunning with the same name resumes it")
    search.add_argument("--device", metavar="DEVICE",
                        help="where the model runs and latency is measured: cpu, cuda, cuda:1... (default cpu)")
    search.add_argument("--seed", metavar="N", type=int,
                        help="seed for the sampler and the random inputs (reproducible searches)")
    search.add_argument("--threads", metavar="N", type=_positive_int,
                        help="torch intra-op threads (latency is measured with this many)")
    search.add_argument("--latency-clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time (default); cpu: the timing thread's CPU time, which leaves out "
                             "waiting for a busy machine's cores (CPU with --threads 1 only)")
    search.add_argument("--timing-process", action="store_true",
                        help="time whole models in a fresh process that does nothing else, as a deployed model runs "
                             "(the search's own heap slows models with more layers); CPU only")
    search.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The ``ranksearch`` argument parser (exposed for documentation tools and tests)."""
    common = _common()
    parser = _Parser(
        prog="ranksearch", parents=[common],
        description="Compress a trained PyTorch model by low-rank decomposition, searched with Optuna "
                    "against a latency, FLOP or parameter budget.",
        epilog="Run 'ranksearch COMMAND --help' for each command's options. Exit status: 0 success, 1 refused "
               "or failed (the message says why), 2 bad command line.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    optimize = commands.add_parser(
        "optimize", parents=[common], help="search a compression plan and write it, the model and a report",
        description="Search the per-layer decomposition plan that meets the budget with the best quality. "
                    "Writes to --out: plan.json, compressed.pt (the plan and the compressed weights; load it "
                    "with ranksearch.model_io.load_compressed and the original's factory), compressed.pt2 (a "
                    "torch.export program, when the model exports), report.md with its figures and, for an "
                    "answer less than 5% under a latency target, spare_plan_N.json: it cut further under (apply "
                    "one with 'ranksearch apply' when your own timing finds the answer over the target).",
    )
    optimize.epilog = (
        "example: ranksearch optimize examples.digits_factory:trained_cnn --input-shape 1,1,16,16 "
        "--target-flops 0.5 --eval-fn examples.digits_factory:validation_accuracy --search-space convnet "
        "--trials 40 --storage runs/digits.db --study-name digits --out runs/digits"
    )
    _add_model(optimize)
    _add_inputs(optimize)
    _add_search(optimize, storage_required=False)
    output = optimize.add_argument_group("output")
    output.add_argument("--out", metavar="DIR", type=Path, default=Path("ranksearch-out"),
                        help="folder for the plan, the compressed model and the report (default ranksearch-out)")
    output.add_argument("--no-export", action="store_true", help="do not write the torch.export program (.pt2)")

    worker = commands.add_parser(
        "worker", parents=[common], help="join an existing study and run trials (scale-out)",
        description="Join a study that 'ranksearch optimize' started on a shared --storage and run trials for "
                    "it. Give the same model, inputs, targets and search space as the study was started with "
                    "(a study made for another model, space or budget is refused). --trials is the study's "
                    "total: a worker stops when the study has that many finished trials. Use a different "
                    "--seed per worker (or none), or workers sample the same plans.",
    )
    _add_model(worker)
    _add_inputs(worker)
    _add_search(worker, storage_required=True)

    apply = commands.add_parser(
        "apply", parents=[common], help="apply a plan to a model and save the compressed model",
        description="Rebuild the compressed model from a plan and the original model, and save it: OUT ending "
                    "in .pt2 is a torch.export program (needs --input-shape or --inputs); anything else is a "
                    "weights-only bundle of the plan and the compressed state_dict.",
    )
    apply.add_argument("plan", metavar="PLAN", help="a plan JSON file (plan.json from 'ranksearch optimize')")
    _add_model(apply)
    _add_inputs(apply, calibration=False)
    apply.add_argument("--out", metavar="FILE", type=Path, required=True, help="the compressed model file to write")

    report = commands.add_parser(
        "report", parents=[common], help="write the Markdown report and figures of a study or a plan",
        description="Write report.md and PNG figures (Pareto front, per-layer choices, best score over trials) "
                    "from a study in a storage, from a plan file, or both. Without a plan the study's best "
                    "feasible trial is reported.",
    )
    report.add_argument("--plan", metavar="FILE", help="a plan JSON file written by 'ranksearch optimize'")
    report.add_argument("--storage", metavar="URL", help=_STORAGE_HELP)
    report.add_argument("--study-name", metavar="NAME", help="the study's name in --storage")
    report.add_argument("--out", metavar="DIR", type=Path, required=True, help="folder to write the report to")

    commands.add_parser("spaces", parents=[common], help="list the shipped search spaces",
                        description="List the search spaces shipped with ranksearch, for --search-space.")
    commands.add_parser("methods", parents=[common], help="list the decomposition methods",
                        description="List the registered decomposition methods and the layer kinds each applies to.")
    return parser


# --- helpers shared by the commands -------------------------------------------------------------


@contextlib.contextmanager
def _session(args: argparse.Namespace) -> Iterator[None]:
    """Logging, warnings and threads as the options ask, restored afterwards (main() may run in-process)."""
    import matplotlib
    import optuna

    matplotlib.use("Agg")  # figures are written to files; never open a window
    verbosity = getattr(args, "verbose", 0) or 0
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger("ranksearch")
    py_warnings = logging.getLogger("py.warnings")
    saved_root, saved_level = root.handlers[:], root.level
    saved_py, saved_propagate = py_warnings.handlers[:], py_warnings.propagate
    saved_optuna = optuna.logging.get_verbosity()
    threads = getattr(args, "threads", None)
    saved_threads = None
    with warnings.catch_warnings():
        root.handlers = [h for h in root.handlers if isinstance(h, logging.NullHandler)] + [handler]
        root.setLevel(level)
        # library warnings (torch, fvcore, optuna) go through logging: hidden unless -v
        logging.captureWarnings(True)
        py_warnings.handlers = [handler] if verbosity else [logging.NullHandler()]
        py_warnings.propagate = False
        if not verbosity:
            warnings.simplefilter("ignore")
        optuna.logging.set_verbosity(optuna.logging.INFO if verbosity >= 2 else optuna.logging.WARNING)
        if threads:
            import torch

            saved_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            logging.captureWarnings(False)
            root.handlers, py_warnings.handlers, py_warnings.propagate = saved_root, saved_py, saved_propagate
            root.setLevel(saved_level)
            optuna.logging.set_verbosity(saved_optuna)
            if saved_threads is not None:
                import torch

                torch.set_num_threads(saved_threads)


def _check_inputs(args: argparse.Namespace) -> None:
    if args.inputs and args.input_shape:
        raise _UsageError("give either --inputs or --input-shape, not both")
    if args.input_dtype and not args.input_shape:
        raise _UsageError("--input-dtype goes with --input-shape")
    if args.input_dtype and len(args.input_dtype) not in (1, len(args.input_shape)):
        raise _UsageError(f"{len(args.input_dtype)} --input-dtype for {len(args.input_shape)} --input-shape: "
                          "give one dtype for all inputs or one per shape")


def _example_inputs(args: argparse.Namespace, model: Any) -> Any:
    from .model_io import load_inputs, random_inputs

    _check_inputs(args)
    if args.inputs:
        return load_inputs(args.inputs)
    if args.input_shape:
        return random_inputs(args.input_shape, args.input_dtype, model, seed=getattr(args, "seed", None) or 0)
    return None


def _check_targets(args: argparse.Namespace) -> None:
    if all(v is None for v in (args.target_latency_ms, args.target_latency_ratio, args.target_flops,
                               args.target_params)):
        raise _UsageError("give at least one target: --target-latency-ms, --target-latency-ratio, --target-flops "
                          "or --target-params")


def _run_optimize(args: argparse.Namespace) -> tuple[Any, Any]:
    """Validate cheap options first, then load the model and run :func:`ranksearch.optimize`.

    Returns the result and the example inputs used (``None`` when optimize inferred them).
    """
    _check_targets(args)
    _check_inputs(args)
    from .exceptions import InvalidInputsError
    from .model_io import load_calibration, load_model, resolve_callable
    from .search import optimize
    from .space import load_space

    space = load_space(args.search_space)  # an unknown space fails before the model is loaded
    eval_fn = resolve_callable(args.eval_fn, what="--eval-fn") if args.eval_fn else None
    finetune_fn = resolve_callable(args.finetune_fn, what="--finetune-fn") if args.finetune_fn else None
    storage = _storage_url(args.storage) if args.storage else None
    if storage is not None and args.study_name is None:
        raise _UsageError("--storage needs --study-name, so that the study can be found again")
    if storage is not None and storage.startswith("sqlite:///") and storage != "sqlite:///:memory:":
        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)  # a new study's database
    model = load_model(args.model, factory=args.factory, trust_model_file=args.trust_model_file)
    inputs = _example_inputs(args, model)
    calib = load_calibration(args.calib_data) if args.calib_data else None
    try:
        result = optimize(
            model, inputs, target_latency_ms=args.target_latency_ms, target_latency_ratio=args.target_latency_ratio,
            target_flops=args.target_flops,
            target_params=args.target_params, eval_fn=eval_fn, calib_data=calib, n_trials=args.trials,
            timeout=args.timeout, search_space=space, storage=storage, study_name=args.study_name,
            device=args.device, seed=args.seed, threads=args.threads, latency_clock=args.latency_clock,
            show_progress_bar=not args.no_progress, finetune_fn=finetune_fn, timing_process=args.timing_process,
            recalibrate_batchnorm={"auto": None, "on": True, "off": False}[args.batchnorm_recalibration],
            **({} if args.finetune_candidates is None else {"finetune_candidates": args.finetune_candidates}),
        )
    except InvalidInputsError as exc:
        if inputs is None and calib is None:
            raise InvalidInputsError(f"{exc} (on the command line: --input-shape 1,3,224,224 or --inputs FILE)") from exc
        raise
    return result, inputs


def _open_study(storage_text: str, study_name: str) -> Any:
    """Load an existing study, with messages for a missing database or study name."""
    import optuna

    from .exceptions import StorageError

    url = _storage_url(storage_text)
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url[len("sqlite:///"):])
        if not path.is_file():
            raise StorageError(f"storage {storage_text!r}: the SQLite file {str(path)!r} does not exist")
    try:
        storage = optuna.storages.RDBStorage(url)
    except Exception as exc:  # sqlalchemy's errors vary by backend; all mean the same here
        raise StorageError(f"cannot open storage {storage_text!r} ({type(exc).__name__}: {exc})") from exc
    names = optuna.get_all_study_names(storage)
    if study_name not in names:
        known = ", ".join(repr(n) for n in names) or "none"
        raise StorageError(f"no study {study_name!r} in storage {storage_text!r} (studies there: {known})")
    return optuna.load_study(study_name=study_name, storage=storage)


# --- commands -----------------------------------------------------------------------------------


def _cmd_optimize(args: argparse.Namespace) -> int:
    from .cost.latency import model_device
    from .exceptions import TargetUnreachableError
    from .model_io import export_program, save_compressed
    from .report import write_report

    try:
        result, inputs = _run_optimize(args)
    except TargetUnreachableError as exc:
        if exc.best_plan is not None:
            path = exc.best_plan.save(args.out / "best_plan_over_budget.json")
            exc.args = (f"{exc.args[0]}; the best plan found is in {path}",)
        raise
    out: Path = args.out
    written = [result.plan.save(out / "plan.json"), save_compressed(result.model, result.plan, out / "compressed.pt")]
    if not args.no_export and inputs is None:
        log.warning("no --input-shape or --inputs given: the torch.export program (.pt2) is not written")
    elif not args.no_export:
        try:
            device = model_device(result.model)
            on_device = tuple(v.to(device) for v in inputs)
            written.append(export_program(result.model, on_device, out / "compressed.pt2"))
        except Exception as exc:  # torch.export fails in many ways on dynamic models; the .pt still holds it all
            log.warning("the compressed model could not be exported with torch.export (%s: %s); "
                        "compressed.pt holds it", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    written.append(write_report(out, result=result))
    written += _write_spares(result, out)
    print(result.summary())
    print()
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _write_spares(result: Any, out: Path) -> list[Path]:
    """The answer's headroom spares (``SearchResult.headroom_spares``) as plan files beside plan.json,
    best quality first: what to apply (``ranksearch apply``) when your own timing finds the answer over
    the target. Each says in its metadata which trial it is, which plan it was cut from, and its trial's
    latency and score."""
    paths = []
    for number, spare in enumerate(result.headroom_spares(), start=1):
        plan = copy.deepcopy(spare.plan)
        plan.metadata = {"headroom_spare_for": spare.spare_for, "trial": spare.trial,
                         "study": result.plan.metadata.get("study"), "targets": result.targets,
                         "latency_ms_in_its_trial": spare.trial_latency_ms,
                         "score": spare.score, "fine_tuned": False,
                         **{k: v for k, v in spare.plan.metadata.items() if k == "batchnorm_recalibration"}}
        paths.append(plan.save(out / f"spare_plan_{number}.json"))
    return paths


def _cmd_worker(args: argparse.Namespace) -> int:
    _open_study(args.storage, args.study_name)  # a worker joins; it does not start a study
    result, _ = _run_optimize(args)
    finished = [t for t in result.study.get_trials(deepcopy=False) if t.state.is_finished()]
    print(f"study {result.study.study_name!r} has {len(finished)} finished trials; best feasible: trial "
          f"{result.plan.metadata.get('trial')} with quality {result.final.score:.4f}")
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    from .model_io import export_program, load_calibration, load_model, save_compressed
    from .plan import CompressionPlan
    from .rebuild import apply_plan

    out: Path = args.out
    _check_inputs(args)
    if out.suffix == ".pt2" and not (args.inputs or args.input_shape):
        raise _UsageError("a .pt2 export program needs example inputs: --input-shape or --inputs")
    plan = CompressionPlan.load(args.plan)
    model = load_model(args.model, factory=args.factory, trust_model_file=args.trust_model_file)
    calib = load_calibration(args.calib_data) if args.calib_data else None
    if calib is None and plan.metadata.get("batchnorm_recalibration"):
        print("warning: this plan's search re-estimated BatchNorm statistics on its calibration data; pass the same "
              "--calib-data to rebuild the same model (without it, the original's statistics are kept)", file=sys.stderr)
    with warnings.catch_warnings():  # said above, in the command line's words
        warnings.simplefilter("ignore", UserWarning)
        compressed = apply_plan(model, plan, calib_data=calib).eval()
    if out.suffix == ".pt2":
        path = export_program(compressed, _example_inputs(args, model), out)
    else:
        path = save_compressed(compressed, plan, out)
    print(f"wrote {path} ({len(plan)} layers decomposed)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .plan import CompressionPlan
    from .report import write_report

    if args.plan is None and args.storage is None:
        raise _UsageError("give --plan FILE, or --storage URL with --study-name NAME (or both)")
    if (args.storage is None) != (args.study_name is None):
        raise _UsageError("--storage and --study-name go together")
    plan = CompressionPlan.load(args.plan) if args.plan else None
    study = _open_study(args.storage, args.study_name) if args.storage else None
    path = write_report(args.out, plan=plan, study=study)
    print(f"wrote {path}")
    return 0


def _cmd_spaces(args: argparse.Namespace) -> int:
    from .exceptions import RankSearchError
    from .space import list_spaces, load_space

    for name in list_spaces():
        try:
            space = load_space(name)
        except RankSearchError as exc:
            print(f"{name}\n    (cannot be used with this installation: {exc})")
            continue
        methods = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in space.methods.items())
        print(f"{name}\n    {space.description}\n    methods - {methods}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from .decompose import get_method, methods

    for name in methods():
        method = get_method(name)
        print(f"{name:<10} {', '.join(method.kinds)}")
        for line in textwrap.wrap(method.summary or "(no summary)", 90):
            print(f"           {line}")
    return 0


_COMMANDS = {
    "optimize": _cmd_optimize, "worker": _cmd_worker, "apply": _cmd_apply, "report": _cmd_report,
    "spaces": _cmd_spaces, "methods": _cmd_methods,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 1 failure, 2 usage, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    debug = getattr(args, "debug", False)
    prog = f"ranksearch {args.command}"
    try:
        with _session(args):
            return _COMMANDS[args.command](args)
    except _UsageError as exc:
        print(f"{prog}: error: {exc} (see '{prog} --help')", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (trials so far are kept: rerun with the same --storage and --study-name to resume)" \
            if getattr(args, "storage", None) else ""
        print(f"{prog}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:
        from .exceptions import RankSearchError

        if debug:
            raise
        message = " ".join(str(exc).split())  # one line, whatever the exception's formatting
        if isinstance(exc, RankSearchError):
            print(f"{prog}: error: {message}", file=sys.stderr)
        else:
            print(f"{prog}: unexpected error: {type(exc).__name__}: {message} (rerun with --debug for the "
                  "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
