"""The verdicts of every full benchmark run, kept side by side: one run is not enough to trust.

On this kind of machine two interleaved timings of the same plan a minute apart differ by several
percent, and at the tighter targets a few percent of latency moves accuracy by tenths, so a
verdict (ranksearch vs the best baseline) can flip from one run to the next. Each full run of
``compare.py`` appends its verdicts to ``results/verdicts.jsonl`` (one JSON object a run: when,
at which commit, how long it took, and per setting the verdict word for ``ranksearch`` and for
``ranksearch-ft``), and RESULTS.md shows the last runs next to each other, so a reader sees which
verdicts hold and which are noise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HISTORY = Path(__file__).resolve().parent / "results" / "verdicts.jsonl"
#: runs shown side by side in RESULTS.md
SHOWN = 6
WORDS = ("yes", "tie", "no", "misses", "no plan", "unreachable")


def verdict_word(verdict: str) -> str:
    """``"yes"``, ``"tie"``, ``"no"``, ``"misses"``, ``"no plan"`` (the search returned none) or
    ``"unreachable"`` (no method met the target, and the search said so) from a verdict cell
    (``"tie (-0.004)"``...)."""
    for words in ("misses", "no plan", "unreachable"):
        if words in verdict:
            return words
    for word in ("yes", "tie", "no"):
        if word in verdict:
            return word
    raise ValueError(f"not a verdict: {verdict!r}")


def git_commit(repo: Path) -> str:
    """The short commit the benchmark ran at, marked ``+changes`` when the tree had uncommitted edits."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def record(verdicts: Sequence[dict[str, Any]], *, minutes: float, commit: str, spread: float | None = None,
           cpu: str | None = None, path: Path = HISTORY, date: str | None = None) -> dict[str, Any]:
    """Append one run (``verdicts``: dicts with model, batch, target, ranksearch, ranksearch-ft;
    ``spread``: the run's median spread of the final latency ratios, how noisy the machine was;
    ``cpu``: the vector instructions torch used, ``torch.backends.cpu.get_cpu_capability()``: machines
    of this kind differ, and the CNN's latency profile with them)."""
    run = {"date": date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "commit": commit, "minutes": round(minutes, 1),
           "spread_median": None if spread is None else round(spread, 3), "verdicts": list(verdicts)}
    if cpu is not None:
        run["cpu"] = cpu
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(run) + "\n")
    return run


def load(path: Path = HISTORY) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _spread(run: dict[str, Any]) -> str:
    spread = run.get("spread_median")
    return ("" if spread is None else f", spread {spread:.0%}") + (f", {run['cpu']}" if run.get("cpu") else "")


def _counts(run: dict[str, Any], method: str) -> str:
    words = [v[method] for v in run["verdicts"]]
    return " / ".join(f"{words.count(w)} {w}" for w in WORDS if words.count(w))


def history_md(runs: Sequence[dict[str, Any]], shown: int = SHOWN) -> list[str]:
    """Markdown lines: per setting, each of the last ``shown`` runs' verdicts (without / after
    fine-tuning), then each run's counts and how many runs agree per setting."""
    runs = list(runs)[-shown:]
    if not runs:
        return []
    head = " | ".join(f"{r['commit']} ({r['date'][:10]}, {r['minutes']:.1f} min{_spread(r)})" for r in runs)
    lines = [f"| model | batch | target | {head} | same verdict in every run? |",
             "|---|---|---|" + "---|" * len(runs) + "---|"]
    settings = list(dict.fromkeys((v["model"], v["batch"], v["target"]) for r in runs for v in r["verdicts"]))
    for model, batch, target in settings:
        cells, pairs = [], []
        for run in runs:
            by_setting = {(v["model"], v["batch"], v["target"]): v for v in run["verdicts"]}
            found = by_setting.get((model, batch, target))
            pair = (found["ranksearch"], found["ranksearch-ft"]) if found else None
            pairs.append(pair)
            cells.append(f"{pair[0]} / {pair[1]}" if pair else "-")
        present = [p for p in pairs if p]
        steady = [name for name, i in (("without FT", 0), ("after FT", 1)) if len({p[i] for p in present}) == 1]
        lines.append(f"| {model} | {batch} | {target:.2f} | " + " | ".join(cells) + f" | {', '.join(steady) or 'no'} |")
    lines += ["", "Counts per run (without fine-tuning; after fine-tuning):", ""]
    lines += [f"- {r['commit']} ({r['date']}): {_counts(r, 'ranksearch')}; {_counts(r, 'ranksearch-ft')}" for r in runs]
    return lines


def verdicts_from_results(text: str) -> tuple[list[dict[str, Any]], float, float | None]:
    """The verdicts, run minutes and median latency spread read back from a RESULTS.md that
    ``compare.py`` wrote (for runs made before this history was kept)."""
    minutes = re.search(r"full mode, ([0-9.]+) min", text)
    if minutes is None:
        raise ValueError("not the RESULTS.md of a full run: no 'full mode, N min' in its first lines")
    spread = re.search(r"Spread of the final latency ratios .*?: median ([0-9.]+)%", text)
    start = text.index("## Verdict: ")
    verdicts = []
    for line in text[start:].splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 11 and cells[1] in ("cnn", "minilm"):
            verdicts.append({"model": cells[1], "batch": cells[2], "target": float(cells[3]),
                             "ranksearch": verdict_word(cells[6]), "ranksearch-ft": verdict_word(cells[9])})
        elif verdicts and not line.startswith("|"):
            break
    return verdicts, float(minutes.group(1)), float(spread.group(1)) / 100 if spread else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Add an earlier full run's verdicts to the history, or show it.")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="append the verdicts of a RESULTS.md written by a full run")
    add.add_argument("results", type=Path)
    add.add_argument("--commit", required=True, help="the commit the run was made at")
    add.add_argument("--date", required=True, help="when it ran, e.g. '2026-11-28 22:20 UTC'")
    sub.add_parser("show", help="print the side-by-side table")
    args = parser.parse_args(argv)
    if args.command == "add":
        verdicts, minutes, spread = verdicts_from_results(args.results.read_text(encoding="utf-8"))
        record(verdicts, minutes=minutes, commit=args.commit, spread=spread, date=args.date)
    print("\n".join(history_md(load())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
