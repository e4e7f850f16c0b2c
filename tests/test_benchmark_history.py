"""benchmarks/history.py: the verdicts of full benchmark runs, kept and shown side by side."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import history


def test_verdict_words_from_the_verdict_cells() -> None:
    assert history.verdict_word("yes") == "yes"
    assert history.verdict_word("tie (-0.004)") == "tie"
    assert history.verdict_word("**no** (-0.067)") == "no"
    assert history.verdict_word("**no** (misses)") == "misses"
    assert history.verdict_word("**no** (no plan)") == "no plan"
    assert history.verdict_word("unreachable (no method met it)") == "unreachable"
    with pytest.raises(ValueError, match="not a verdict"):
        history.verdict_word("0.9518")


def _run(*words: tuple[str, str]) -> list[dict]:
    settings = [("cnn", "batch 1", 0.7), ("cnn", "batch 1", 0.5)]
    return [{"model": m, "batch": b, "target": t, "ranksearch": w[0], "ranksearch-ft": w[1]}
            for (m, b, t), w in zip(settings, words, strict=True)]


def test_runs_are_appended_and_shown_side_by_side(tmp_path) -> None:
    path = tmp_path / "results" / "verdicts.jsonl"
    history.record(_run(("yes", "tie"), ("no", "yes")), minutes=28.9, commit="aaa111", spread=0.09, path=path,
                   date="2026-11-27 10:00 UTC")
    history.record(_run(("yes", "tie"), ("yes", "misses")), minutes=30.2, commit="bbb222", spread=0.12, cpu="AVX2",
                   path=path)
    runs = history.load(path)
    assert [r["commit"] for r in runs] == ["aaa111", "bbb222"]  # appended, oldest first
    assert runs[0]["verdicts"][1]["ranksearch"] == "no"

    lines = history.history_md(runs)
    assert "aaa111 (2026-11-27, 28.9 min, spread 9%)" in lines[0]
    assert "bbb222" in lines[0] and "30.2 min, spread 12%, AVX2)" in lines[0]  # the machine's vector instructions
    row_07 = next(line for line in lines if line.startswith("| cnn | batch 1 | 0.70 |"))
    row_05 = next(line for line in lines if line.startswith("| cnn | batch 1 | 0.50 |"))
    assert "| yes / tie | yes / tie | without FT, after FT |" in row_07  # the same in both runs
    assert "| no / yes | yes / misses | no |" in row_05  # changed both ways
    assert "- aaa111 (2026-11-27 10:00 UTC): 1 yes / 1 no; 1 yes / 1 tie" in lines


def test_only_the_last_runs_are_shown(tmp_path) -> None:
    path = tmp_path / "verdicts.jsonl"
    for i in range(history.SHOWN + 2):
        history.record(_run(("yes", "yes"), ("yes", "yes")), minutes=1.0, commit=f"c{i}", path=path)
    header = history.history_md(history.load(path))[0]
    assert "c0 " not in header and "c1 " not in header and f"c{history.SHOWN + 1} " in header
    assert history.history_md([]) == []


def test_an_earlier_runs_verdicts_are_read_back_from_its_results_md(tmp_path) -> None:
    text = "\n".join([
        "# ranksearch vs baselines and peers", "",
        "Written by `python benchmarks/compare.py` (full mode, 28.9 min on 2 cores, torch 2.13.0+cpu).", "",
        "Spread of the final latency ratios (range of the per-round ratios / ratio), over 96 rows: median 9.0%, "
        "90th percentile 19.8%, worst 69.1%.", "",
        "## Verdict: is ranksearch at least as good as the best baseline, at equal or lower latency?", "",
        "| model | batch | target | ranksearch: latency, test | best baseline | >= it? | ranksearch-ft | best after FT | >= it? |",
        "|---|---|---|---|---|---|---|---|---|",
        "| cnn | batch 1 | 0.70 | 0.71, 0.9518 | energy: 0.71, 0.9518 | yes | 0.72, 0.9907 | uniform-spatial: 0.65, 0.9944 | tie (-0.004) |",
        "| minilm | batch 8 | 0.35 | 0.34, 0.5098 | aimet-greedy: 0.34, 0.3457 | yes | 0.37 (misses), 0.6213 | aimet-greedy: 0.34, 0.4672 | **no** (misses) |",
        "", "| cnn | batch 1 | 0.70 | a row of another table | | | | | | |",
    ])
    verdicts, minutes, spread = history.verdicts_from_results(text)
    assert minutes == 28.9 and spread == pytest.approx(0.09)
    assert verdicts == [
        {"model": "cnn", "batch": "batch 1", "target": 0.7, "ranksearch": "yes", "ranksearch-ft": "tie"},
        {"model": "minilm", "batch": "batch 8", "target": 0.35, "ranksearch": "yes", "ranksearch-ft": "misses"},
    ]
    with pytest.raises(ValueError, match="full run"):
        history.verdicts_from_results(text.replace("full mode", "quick mode"))
