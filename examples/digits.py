"""scikit-learn's handwritten digits as PyTorch tensors, and a small CNN to train on them.

The digits data ships with scikit-learn (1,797 8x8 images), so everything here runs offline.
Images can be upsampled (e.g. to 32x32) so that convolutions do enough work to be worth compressing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

__all__ = ["Digits", "load_digits_tensors", "DigitsCNN", "train", "accuracy", "correct"]


@dataclass(frozen=True)
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_tensors(size: int = 8, *, seed: int = 0, test_size: float = 0.25) -> Digits:
    """Digits as (N, 1, size, size) float tensors, standardised, with a fixed stratified split."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(data.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_size, random_state=seed, stratify=labels.numpy()
    )
    return Digits(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


class DigitsCNN(nn.Module):
    """A plain conv net: four 3x3 conv blocks (two with stride 2), global pooling, a linear classifier."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                                 nn.BatchNorm2d(c_out), nn.ReLU())

        self.features = nn.Sequential(
            block(1, width), block(width, 2 * width, stride=2), block(2 * width, 2 * width),
            block(2 * width, 4 * width, stride=2), block(4 * width, 4 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def train(model: nn.Module, data: Digits, *, epochs: int = 10, lr: float = 3e-3, batch_size: int = 64,
          seed: int = 0) -> nn.Module:
    """Adam with cosine decay on the training split; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(data.y_train) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.y_train), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Whether ``model`` (in eval mode) gets each item of ``x`` right (its top-1 class is ``y``'s)."""
    was_training = model.training
    model.eval()
    right = torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size] for i in range(0, len(y), batch_size)])
    model.train(was_training)
    return right


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``x``, ``y``."""
    return int(correct(model, x, y, batch_size).sum()) / len(y)
