"""Cost models on this CPU: FLOP ratio vs measured latency ratio, and the latency predictor's error.

For a ResNet-style CNN (32x32 input) and a small transformer encoder (64 tokens), batch 1, random
weights:

1. per layer: the anchors of the latency table (each replacement timed alone) as FLOP ratio vs
   latency ratio against the original layer;
2. whole model, one method applied uniformly at several cost fractions: FLOP ratio (fvcore) vs
   measured latency ratio, and what the table predicts;
3. a few dozen random plans (random method and rank per layer): the predictor's median and worst
   relative error against full-model measurements, from the table alone and calibrated online
   (each plan predicted *before* its measurement is recorded).

Writes benchmarks/results/cost_models.md and prints it. ``--quick`` takes about a minute.

    python benchmarks/bench_cost_models.py [--quick] [--threads 1] [--plans 36]
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ranksearch
from ranksearch import CompressionPlan, LayerChoice, apply_plan, capture_layer_specs, get_method
from ranksearch.cost import (
    FLOP_CONVENTION, LatencyPredictor, LatencyTable, count_flops, count_params, measure_latency,
)
from ranksearch.layers import LayerSpec
from ranksearch.workbench import plan_cost

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import ResNetCNN  # the benchmark's CNN; here with 3 input channels, 32/64/96 wide, random weights

RESULTS = Path(__file__).resolve().parent / "results" / "cost_models.md"


# --- models -----------------------------------------------------------------------------------------


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        # explicit matmuls (not scaled_dot_product_attention) so that fvcore counts attention
        attn = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.o((attn @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.ff2(torch.nn.functional.gelu(self.ff1(self.norm2(x))))


class TinyEncoder(nn.Module):
    """Token embedding + 4 pre-norm encoder blocks (dim 192, 4 heads, FFN 768) + classifier."""

    def __init__(self, vocab: int = 1000, dim: int = 192, heads: int = 4, hidden: int = 768, depth: int = 4, tokens: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.embed(ids) + self.pos[:, : ids.shape[1]])
        return self.head(self.norm(x).mean(1))


# --- helpers ----------------------------------------------------------------------------------------


def applicable(spec: LayerSpec) -> list[str]:
    return [m for m in ranksearch.methods() if get_method(m).supports(spec)]


def timing_copy(model: nn.Module, plan: CompressionPlan) -> nn.Module:
    """The compressed model's structure with random weights: timing does not depend on the values,
    and skipping the factorizations (seconds each for the tensor-network methods) keeps this short."""
    compressed = apply_plan(model, plan, load_weights=False)
    with torch.no_grad():
        for choice in plan.replaced:  # structure() may leave weights uninitialised (NaN, denormals)
            for param in compressed.get_submodule(choice.name).parameters():
                param.normal_(0.0, 0.02)
    return compressed.eval()


def table_md(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rel(a: float, b: float) -> str:
    return f"{a / b:.2f}"


class Bench:
    def __init__(self, args: argparse.Namespace, cache_dir: Path) -> None:
        self.args = args
        self.cache_dir = cache_dir
        self.quick = args.quick
        self.full_run_time = 0.1 if args.quick else 0.3
        self.table_options = {
            "threads": args.threads, "cache_dir": cache_dir, "clock": args.clock,
            "anchors": 4 if args.quick else 5, "min_run_time": 0.03 if args.quick else 0.05,
        }
        self.spreads: list[float] = []
        self.sections: list[str] = []

    def measure(self, model: nn.Module, x: Any) -> float:
        m = measure_latency(model, x, threads=self.args.threads, min_run_time=self.full_run_time, max_attempts=3,
                            clock=self.args.clock)
        self.spreads.append(m.spread)
        return m.ms

    def run_model(self, title: str, model: nn.Module, x: Any, rng: random.Random) -> dict[str, Any]:
        model.eval()
        specs_list = capture_layer_specs(model, x)
        specs = {s.name: s for s in specs_list}
        flops = count_flops(model, x)
        candidates = {name: applicable(spec) for name, spec in specs.items()}
        start = time.perf_counter()
        table = LatencyTable(model, x, specs_list, **self.table_options)
        table.prepare(candidates)
        table_s = time.perf_counter() - start
        again = LatencyTable(model, x, specs_list, **self.table_options)
        again.prepare(candidates)
        baseline = self.measure(model, x)

        def measure_plan(plan: CompressionPlan) -> tuple[float, float]:
            """The plan's latency, and the baseline measured again right before it: the machine's
            load drifts, and a ratio of two measurements taken together is free of that drift."""
            baseline_now = self.measure(model, x)
            return self.measure(timing_copy(model, plan), x), baseline_now

        out = [f"## {title}", "",
               f"{count_params(model):,} params, {flops / 1e6:.1f} M flops (fvcore), {len(specs)} candidate layers, "
               f"baseline {baseline:.3f} ms. Latency table: {table.measurements} layer measurements in {table_s:.1f} s; "
               f"a second table on the same model took {again.measurements} (disk cache).", ""]

        # 1. per layer: the measured anchors
        by_flops = sorted(specs.values(), key=lambda s: s.flops, reverse=True)
        shown = [by_flops[0]] + [
            s for s in by_flops[1:] if (s.kind, s.kernel_size) != (by_flops[0].kind, by_flops[0].kernel_size)
        ][:1]
        rows = []
        for spec in shown:
            original = table.original_ms(spec.name)
            for method in candidates[spec.name]:
                for rank, _cost, ms in table.measured_points(spec.name, method):
                    ratio = get_method(method).cost(spec, rank).flops / spec.flops if spec.flops else float("nan")
                    rows.append([spec.name, method, rank, f"{ratio:.2f}", rel(ms, original), f"{ms:.4f}"])
        out += ["### Per layer (each timed alone; ratio to the original layer)", "",
                table_md(["layer", "method", "rank", "FLOP ratio", "latency ratio", "ms"], rows), ""]

        # 2. random plans
        predictor_raw = LatencyPredictor(table, baseline, calibrate=False)
        predictor = LatencyPredictor(table, baseline)  # fed the measured ms, as a search would
        predictor_steady = LatencyPredictor(table, baseline)  # fed the ms corrected for machine drift
        errors: dict[str, list[float]] = {"flops": [], "raw": [], "flops_steady": [], "raw_steady": []}
        drifts = []
        for _ in range(self.args.plans):
            choices = []
            for name, spec in specs.items():
                if not candidates[name] or rng.random() < 0.3:
                    continue
                method = rng.choice(candidates[name])
                rank = get_method(method).rank_for_cost_fraction(spec, rng.uniform(0.1, 1.0))
                if rank is None:
                    rank = get_method(method).rank_from_scale(spec, 0.0)
                choices.append(LayerChoice(name, method, rank))
            plan = CompressionPlan.for_model(model, choices)
            measured, baseline_now = measure_plan(plan)
            steady = measured * baseline / baseline_now
            drifts.append(baseline_now / baseline - 1)
            flop_guess = baseline * (flops - plan_cost(list(specs.values()), plan).flops) / flops  # the naive guess
            predicted = predictor_raw.predict(plan)
            for key, truth in (("", measured), ("_steady", steady)):
                errors["flops" + key].append(abs(flop_guess - truth) / truth)
                errors["raw" + key].append(abs(predicted - truth) / truth)
            predictor.record(plan, measured)
            predictor_steady.record(plan, steady)
        online, online_steady = predictor.error_summary(), predictor_steady.error_summary()

        def cells(values: list[float]) -> list[str]:
            return [f"{statistics.median(values):.1%}", f"{max(values):.1%}"]

        rows = [
            ["latency ∝ FLOPs (naive)", *cells(errors["flops"]), *cells(errors["flops_steady"])],
            ["table: baseline − Σ layer savings", *cells(errors["raw"]), *cells(errors["raw_steady"])],
            ["table + online calibration", f"{online['median_rel_error']:.1%}", f"{online['worst_rel_error']:.1%}",
             f"{online_steady['median_rel_error']:.1%}", f"{online_steady['worst_rel_error']:.1%}"],
        ]
        out += [f"### Predictor error over {self.args.plans} random plans (relative to full-model measurements)", "",
                "Each plan: every layer kept with probability 0.3, else a random applicable method at a random "
                "cost fraction in [0.1, 1]. Online calibration: each plan is predicted before its measurement is "
                "recorded. *Drift-corrected*: the measurement scaled by baseline / baseline re-measured alongside "
                f"it (the machine's drift over this section: median {statistics.median(drifts):+.1%}, "
                f"range {min(drifts):+.1%} to {max(drifts):+.1%}).", "",
                table_md(["predictor", "median error", "worst error", "median (drift-corrected)",
                          "worst (drift-corrected)"], rows), "",
                f"Calibration after the last check: savings × {predictor.scale:.2f}, "
                f"{predictor.ms_per_mparam:.2f} ms per million parameters removed, "
                f"{predictor.per_layer_ms * 1e3:+.1f} µs per replaced layer.", ""]

        # 3. whole model, one method everywhere it applies; calibration frozen after section 2
        rows = []
        methods_here = sorted({m for ms in candidates.values() for m in ms}, key=ranksearch.methods().index)
        for method in methods_here:
            for fraction in (0.25, 0.5, 0.75):
                choices = []
                for name, spec in specs.items():
                    if method in candidates[name]:
                        rank = get_method(method).rank_for_cost_fraction(spec, fraction)
                        if rank is not None:
                            choices.append(LayerChoice(name, method, rank))
                if not choices:
                    continue
                plan = CompressionPlan.for_model(model, choices)
                new_flops = flops - plan_cost(list(specs.values()), plan).flops
                # fvcore's count of the rebuilt model must equal the analytic one (slow: full mode only)
                if not self.quick and count_flops(timing_copy(model, plan), x) != new_flops:
                    raise AssertionError(f"{method} at {fraction}: analytic cost differs from fvcore's count")
                measured, baseline_now = measure_plan(plan)
                truth = measured / baseline_now
                raw, calibrated = predictor_raw.predict(plan) / baseline, predictor.predict(plan) / baseline
                rows.append([method, fraction, len(choices), rel(new_flops, flops), f"{truth:.2f}",
                             f"{raw:.2f} ({abs(raw - truth) / truth:.0%})",
                             f"{calibrated:.2f} ({abs(calibrated - truth) / truth:.0%})"])
        out += ["### Whole model, one method on every layer it applies to (layer cost fraction f)", "",
                ("FLOP ratios are analytic (the tests check they equal fvcore's count). " if self.quick else
                 "FLOP ratios: fvcore's count of the rebuilt model, equal to the analytic count in every row. ") +
                "Measured latency ratios are against the baseline measured again alongside each plan.", "",
                "Predicted ratios (error): from the table alone, and with the calibration learnt on the random "
                "plans of section 2 (these plans were not among its checks).", "",
                table_md(["method", "f", "layers", "FLOP ratio", "latency ratio (measured)", "predicted: table",
                          "predicted: calibrated"], rows), ""]

        self.sections += out
        return {"errors": errors, "online": online, "online_steady": online_steady}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer plans, shorter timings (~1 min)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every timing (default 1)")
    parser.add_argument("--plans", type=int, default=None, help="random plans per model (default 36, quick 10)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                        help="'cpu' (default): thread CPU time, steady on a shared machine; 'wall': elapsed time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None, help="latency cache (default: a fresh temporary one)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"where to write the tables (default {RESULTS})")
    args = parser.parse_args(argv)
    args.plans = args.plans or (10 if args.quick else 36)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args, args.cache_dir or Path(tmp))
        with torch.no_grad():
            bench.run_model("ResNet-style CNN, 1x3x32x32", ResNetCNN(widths=(32, 64, 96), in_channels=3),
                            torch.randn(1, 3, 32, 32), rng)
            bench.run_model("Transformer encoder, 1x64 tokens", TinyEncoder(), torch.randint(0, 1000, (1, 64)), rng)
    spreads = sorted(bench.spreads)
    header = [
        "# Cost models: FLOPs vs measured latency on this CPU", "",
        f"`python benchmarks/bench_cost_models.py{' --quick' if args.quick else ''}` — torch {torch.__version__}, "
        f"{args.threads} thread(s), {args.clock} clock, batch 1, random weights, {'quick' if args.quick else 'full'} mode, "
        f"{time.perf_counter() - start:.0f} s.", "",
        f"FLOPs: {FLOP_CONVENTION}. Latency: median over timed blocks (torch.utils.benchmark), "
        "repeated up to 3 times when the spread (IQR/median) exceeds 10%.", "",
        f"Spread of the {len(spreads)} full-model measurements: median {statistics.median(spreads):.1%}, "
        f"90th percentile {spreads[int(0.9 * (len(spreads) - 1))]:.1%}, worst {spreads[-1]:.1%} "
        "(the CPU is shared with other work).", "",
    ]
    text = "\n".join(header + bench.sections)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
