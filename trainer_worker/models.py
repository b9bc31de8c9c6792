"""The built-in models: the Fashion-MNIST CNN, a tiny MLP, and ResNet-18 for benchmarks.

`build(name, ...)` makes any of them from a seed without touching the global
random state, so the same seed always gives the same weights.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer_worker.task import TaskError

CNN_PARAMS = 582_026
MODEL_NAMES = ("mlp", "cnn", "resnet18")
# torchvision is an extra: only ResNet-18 and the Fashion-MNIST downloader use it.
INSTALL_VISION = "pip install 'pwfl[vision]' (or torchvision matching your torch)"


class FashionCnn(nn.Module):
    """Two 5x5 conv + 2x2 max-pool stages, then 1024 -> 512 -> classes (582k params)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5)
        self.fc1 = nn.Linear(64 * 4 * 4, 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)  # type: ignore[no-any-return]


def mlp(features: int, num_classes: int, hidden: int = 32) -> nn.Module:
    """features -> hidden -> classes with one ReLU: tiny and fast, for tests."""
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18, untrained (11.7M params, 45 MB state dict)."""
    try:
        from torchvision.models import resnet18 as tv_resnet18  # slow import, rarely needed
    except ImportError as exc:
        raise TaskError(f"the resnet18 model needs torchvision ({exc}): "
                        f"{INSTALL_VISION}") from exc
    model: nn.Module = tv_resnet18(weights=None, num_classes=num_classes)
    return model


def input_shape(name: str, features: int) -> tuple[int, ...]:
    """The shape of one example that model `name` takes."""
    return {"mlp": (features,), "cnn": (1, 28, 28), "resnet18": (3, 32, 32)}[name]


def build(name: str, *, seed: int, num_classes: int = 10, features: int = 0) -> nn.Module:
    """Model `name` initialised from `seed` (the global RNG is left as it was)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"model must be one of {MODEL_NAMES}, not {name!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "cnn":
            # channels_last: 20% faster training and 40% faster evaluation on one
            # CPU thread (oneDNN's pooling and convolutions prefer NHWC).
            return FashionCnn(num_classes).to(memory_format=torch.channels_last)
        if name == "resnet18":
            return resnet18(num_classes)
        return mlp(features, num_classes)


def count_params(model: nn.Module) -> int:
    """Trainable and frozen parameters alike."""
    return sum(p.numel() for p in model.parameters())
