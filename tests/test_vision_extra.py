"""torchvision is an extra (pwfl[vision]): the paths that use it say so when it is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from trainer_worker import data, models
from trainer_worker.task import TaskError


def test_without_torchvision_resnet_and_download_name_the_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without torchvision, ResNet-18 and the downloader say to install pwfl[vision]."""
    for name in ("torchvision", "torchvision.models", "torchvision.datasets"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(TaskError, match=r"pwfl\[vision\]"):
        models.build("resnet18", seed=0)
    with pytest.raises(TaskError, match=r"pwfl\[vision\]"):
        data._download(Path("/nonexistent"))


def test_the_cnn_and_the_packaged_data_need_no_torchvision(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The default job's model builds with torchvision unimportable."""
    for name in ("torchvision", "torchvision.models", "torchvision.datasets"):
        monkeypatch.setitem(sys.modules, name, None)
    assert models.count_params(models.build("cnn", seed=0)) == models.CNN_PARAMS
