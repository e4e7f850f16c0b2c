"""Small models shared by the tests."""

from __future__ import annotations

import os

import torch
from torch import nn


class SmallCNN(nn.Module):
    """A little conv net with the layer kinds ranksearch decomposes (and some it keeps)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(32, 32, 1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),  # depthwise: always kept
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def small_cnn_inputs(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8)


class SharedLinear(nn.Module):
    """One Linear registered under two names and called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.again = self.proj
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.again(torch.relu(self.proj(x))))


class RefusesToRunIn(nn.Module):
    """A Linear that raises when it runs in the process ``pid``: shows where it was timed."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if os.getpid() == self.pid:
            raise RuntimeError("run in the process it refuses")
        return self.fc(x)
