"""End to end: train a small CNN on scikit-learn's digits, compress it to a latency target on this CPU.

    python examples/digits_cnn.py                    # defaults: 0.6x the measured latency, 40 trials
    python examples/digits_cnn.py --target-ratio 0.5 --trials 80 --out runs/digits

The search scores plans by accuracy on a validation split, with BatchNorm statistics re-estimated
on 256 training images; the before/after table reports accuracy on a separate test split the
search never saw. The trained weights are cached in
examples/.cache so that a rerun skips training.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in a checkout

import ranksearch  # noqa: E402
from examples.digits import DigitsCNN, accuracy, load_digits_tensors, train  # noqa: E402
from ranksearch.cost import measure_latency  # noqa: E402


def trained_model(size: int, width: int, epochs: int, cache: Path) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    data = load_digits_tensors(size)
    model = DigitsCNN(width)
    weights = cache / f"digits_cnn_{size}px_w{width}_e{epochs}.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
        return model.eval(), data
    started = time.perf_counter()
    train(model, data, epochs=epochs)
    print(f"trained in {time.perf_counter() - started:.0f} s")
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    return model.eval(), data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-ratio", type=float, default=0.6, help="latency target as a fraction of the original")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--size", type=int, default=32, help="image side after upsampling the 8x8 digits")
    parser.add_argument("--width", type=int, default=32, help="channels of the first conv")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=1, help="batch size the latency is measured at")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for timing (batch-1 inference of a small CNN gains little from more, "
                             "and one thread times steadily on a shared machine)")
    parser.add_argument("--out", type=Path, default=Path("runs/digits_cnn"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    model, data = trained_model(args.size, args.width, args.epochs, Path(__file__).parent / ".cache")
    half = len(data.y_test) // 2
    x_val, y_val = data.x_test[:half], data.y_test[:half]
    x_test, y_test = data.x_test[half:], data.y_test[half:]
    example = x_val[: args.batch]
    torch.set_num_threads(args.threads)
    baseline = measure_latency(model, example, threads=args.threads)
    target = args.target_ratio * baseline.ms
    print(f"original: {baseline.ms:.3f} ms per batch of {args.batch} (spread {baseline.spread:.1%}), "
          f"test accuracy {accuracy(model, x_test, y_test):.4f}; target {target:.3f} ms")

    result = ranksearch.optimize(
        model, example, target_latency_ms=target, eval_fn=lambda m: accuracy(m, x_val, y_val),
        # training images: the statistics of the BatchNorm layers after a decomposed layer are re-estimated on them
        calib_data=list(data.x_train[:256].split(64)),
        n_trials=args.trials, seed=args.seed, search_space="convnet", threads=args.threads,
    )
    print()
    print(result.summary())
    print(f"\ntest accuracy: original {accuracy(model, x_test, y_test):.4f}, "
          f"compressed {accuracy(result.model, x_test, y_test):.4f} (validation accuracy is the score above)")
    if result.prediction_error:
        print(f"latency prediction error: {result.prediction_error}")
    args.out.mkdir(parents=True, exist_ok=True)
    result.plan.save(args.out / "plan.json")
    torch.save(result.model.state_dict(), args.out / "compressed_state_dict.pt")
    print(f"plan and weights written to {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
