"""Fashion-MNIST loading (real Debian files) and the Dirichlet client partition."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer_worker import data
from trainer_worker.task import TaskError

DEBIAN = data.DEBIAN_DIR
needs_debian = pytest.mark.skipif(
    not (DEBIAN / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="needs the Debian package dataset-fashion-mnist",
)
NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _copy_as_plain(target: Path, corrupt: dict[str, bytes] | None = None) -> Path:
    """A data dir: train files linked to the Debian ones, test files decompressed."""
    target.mkdir(parents=True, exist_ok=True)
    for name in NAMES[:2]:
        (target / f"{name}.gz").symlink_to(DEBIAN / f"{name}.gz")
    for name in NAMES[2:]:
        raw = gzip.decompress((DEBIAN / f"{name}.gz").read_bytes())
        (target / name).write_bytes((corrupt or {}).get(name, raw))
    return target


@needs_debian
def test_train_split_from_debian_package() -> None:
    """The training split has 60000 normalised 1x28x28 images and labels 0..9, 6000 each."""
    split = data.load_split("train", environ={})
    assert split.images.shape == (60_000, 1, 28, 28)
    assert split.images.dtype == torch.float32
    assert split.labels.dtype == torch.int64
    assert torch.bincount(split.labels).tolist() == [6000] * 10
    assert abs(float(split.images.mean())) < 0.01
    assert abs(float(split.images.std()) - 1) < 0.01


@needs_debian
def test_test_split_and_per_process_cache() -> None:
    """The test split has 10000 examples and is loaded once per process."""
    split = data.load_split("test", environ={})
    assert split.images.shape == (10_000, 1, 28, 28)
    assert int(split.labels.min()) == 0
    assert int(split.labels.max()) == 9
    assert data.load_split("test", environ={}) is split


@needs_debian
def test_plain_idx_files_in_data_dir(tmp_path: Path) -> None:
    """Uncompressed IDX files in an explicit data_dir load to the same tensors."""
    plain = data.load_split("test", data_dir=_copy_as_plain(tmp_path / "plain"))
    assert torch.equal(plain.images, data.load_split("test", environ={}).images)


@needs_debian
def test_env_var_comes_before_the_debian_package(tmp_path: Path) -> None:
    """PWFL_DATA_DIR is searched before /usr/share/datasets/fashion-mnist."""
    custom = _copy_as_plain(tmp_path / "custom")
    found = data.find_data_dir(environ={data.ENV_DATA_DIR: str(custom)})
    assert found == custom


@needs_debian
@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda raw: raw[:-10], "expected"),
        (lambda raw: b"\x00\x00\x09\x99" + raw[4:], "not an IDX file"),
        (lambda raw: raw[:6], "not an IDX file"),
    ],
    ids=["truncated", "bad-magic", "header-cut"],
)
def test_corrupt_idx_is_a_clear_task_error(tmp_path: Path, mangle: object, message: str) -> None:
    """A truncated or mislabelled IDX file raises TaskError naming the file."""
    name = "t10k-labels-idx1-ubyte"
    raw = gzip.decompress((DEBIAN / f"{name}.gz").read_bytes())
    bad = _copy_as_plain(tmp_path, {name: mangle(raw)})  # type: ignore[operator]
    with pytest.raises(TaskError, match=message) as info:
        data.load_split("test", data_dir=bad)
    assert name in str(info.value)


@needs_debian
def test_corrupt_gzip_is_a_clear_task_error(tmp_path: Path) -> None:
    """A damaged gzip file raises TaskError saying it cannot be read."""
    target = _copy_as_plain(tmp_path)
    (target / "t10k-images-idx3-ubyte").unlink()
    (target / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(TaskError, match="cannot read"):
        data.load_split("test", data_dir=target)


def test_not_found_lists_every_place_and_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the files anywhere, the error lists each place searched and the remedies."""
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "debian")
    env = {data.ENV_DATA_DIR: str(tmp_path / "env")}
    with pytest.raises(TaskError) as info:
        data.load_split("test", data_dir=tmp_path / "explicit", root=tmp_path / "root",
                        environ=env)
    text = str(info.value)
    for place in ("explicit", "env", "debian", "root/FashionMNIST/raw"):
        assert str(tmp_path / place) in text
    assert "apt-get install dataset-fashion-mnist" in text
    assert "download" in text


@needs_debian
def test_download_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's downloader runs only with download=True, into {root}/FashionMNIST/raw."""
    calls: list[str] = []

    class FakeFashionMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append(root)
            raw = Path(root) / "FashionMNIST" / "raw"
            raw.mkdir(parents=True)
            for name in NAMES:
                (raw / f"{name}.gz").symlink_to(DEBIAN / f"{name}.gz")

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", FakeFashionMNIST)
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "none")
    with pytest.raises(TaskError):
        data.load_split("test", root=tmp_path, environ={})
    assert calls == []
    split = data.load_split("test", root=tmp_path, download=True, environ={})
    assert calls == [str(tmp_path)]
    assert len(split) == 10_000


def _class_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    classes = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=classes) / len(labels)
    mixes = [np.bincount(labels[p], minlength=classes) / len(p) for p in parts]
    return float(np.mean([np.abs(m - overall).sum() / 2 for m in mixes]))


LABELS = np.repeat(np.arange(10), 6000)


def test_partition_is_a_disjoint_cover() -> None:
    """Every example lands in exactly one client."""
    parts = data.dirichlet_partition(LABELS, 6, 0.5, seed=0)
    assert len(parts) == 6
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


def test_partition_is_deterministic_per_seed() -> None:
    """The same seed gives the same split; another seed a different one."""
    first = data.dirichlet_partition(LABELS, 6, 0.5, seed=3)
    again = data.dirichlet_partition(LABELS, 6, 0.5, seed=3)
    other = data.dirichlet_partition(LABELS, 6, 0.5, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_partition_never_leaves_a_client_empty() -> None:
    """Even with tiny alpha and many clients, each client gets at least one example."""
    labels = np.repeat(np.arange(10), 20)
    for seed in range(20):
        parts = data.dirichlet_partition(labels, 100, 0.01, seed=seed)
        assert min(len(p) for p in parts) >= 1
        assert sum(len(p) for p in parts) == len(labels)


def test_skew_grows_as_alpha_shrinks() -> None:
    """Smaller alpha gives clients label mixes further from the global one."""
    skews = [_class_skew(LABELS, data.dirichlet_partition(LABELS, 20, alpha, seed=0))
             for alpha in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 < 0.5 < skews[2]


def test_partition_rejects_impossible_requests() -> None:
    """More clients than examples, or a non-positive alpha, is a ValueError."""
    with pytest.raises(ValueError, match="cannot split"):
        data.dirichlet_partition(np.zeros(3, dtype=np.int64), 4, 1.0, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        data.dirichlet_partition(LABELS, 4, 0.0, seed=0)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=300),
    num_clients=st.integers(1, 40),
    alpha=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_partition_properties_hold_for_any_input(
    labels: list[int], num_clients: int, alpha: float, seed: int
) -> None:
    """For any labels, client count, alpha and seed: a disjoint cover, no client empty."""
    num_clients = min(num_clients, len(labels))
    parts = data.dirichlet_partition(np.array(labels), num_clients, alpha, seed)
    assert min(len(p) for p in parts) >= 1
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
