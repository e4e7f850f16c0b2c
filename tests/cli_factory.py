"""Tiny models and helpers the command-line tests name as ``tests.cli_factory:...``."""

from __future__ import annotations

import torch
from torch import nn

IN_FEATURES = 32


def mlp() -> nn.Module:
    """A seeded three-layer MLP (32 -> 64 -> 64 -> 8): the same weights in every process."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(IN_FEATURES, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


def untrained_mlp() -> nn.Module:
    """The same architecture with other weights (a state_dict of :func:`mlp` loads into it)."""
    return nn.Sequential(nn.Linear(IN_FEATURES, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def not_a_module() -> int:
    return 42


def agreement(model: nn.Module) -> float:
    """An eval_fn: top-1 agreement with :func:`mlp` on fixed inputs."""
    x = torch.randn(64, IN_FEATURES, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((model(x).argmax(1) == mlp()(x).argmax(1)).float().mean())


def distill(model: nn.Module) -> None:
    """A finetune_fn: 20 Adam steps pulling the model's outputs toward :func:`mlp`'s on random inputs."""
    teacher = mlp()
    generator = torch.Generator().manual_seed(2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(20):
        x = torch.randn(64, IN_FEATURES, generator=generator)
        with torch.no_grad():
            wanted = teacher(x)
        loss = nn.functional.mse_loss(model(x), wanted)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def bn_cnn() -> nn.Module:
    """A seeded conv net with batch norm (1x8x8 -> 10) whose statistics are those of the inputs of
    :func:`bn_cnn_calib`'s kind: what BatchNorm re-estimation needs to be tested on the command line."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    model.train()
    with torch.no_grad():  # running statistics of this kind of input
        for _ in range(5):
            model(torch.randn(64, 1, 8, 8, generator=generator))
    return model.eval()


def bn_cnn_calib() -> list[torch.Tensor]:
    """Calibration batches for :func:`bn_cnn`: 128 inputs in two batches."""
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(64, 1, 8, 8, generator=generator) for _ in range(2)]
