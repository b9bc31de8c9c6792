"""Fashion-MNIST from IDX files, and the Dirichlet non-IID client partition.

The loader looks for the four IDX files (gzip or plain) in order: an explicit
`data_dir`, the directory in ``PWFL_DATA_DIR``, the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), then
torchvision's layout under a root (``{root}/FashionMNIST/raw``, root
``~/.cache/pwfl/data`` unless given). It downloads only when asked to. Every
file is validated (magic number, dimensions, byte count) before use, and each
split is loaded once per process.
"""

from __future__ import annotations

import gzip
import os
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer_worker.task import TaskError

MEAN, STD = 0.2860, 0.3530
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_ROOT = Path("~/.cache/pwfl/data")
ENV_DATA_DIR = "PWFL_DATA_DIR"

_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801
_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
_HOW_TO_GET = (
    "Install it with `apt-get install dataset-fashion-mnist`, point data_dir or "
    f"{ENV_DATA_DIR} at a folder holding the four IDX files, or pass download=True "
    "(--download) on a machine with internet access."
)


@dataclass(frozen=True)
class Split:
    """One split in memory: normalised images (N, 1, 28, 28) float32, labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


_cache: dict[tuple[Path, str], Split] = {}
_cache_lock = threading.Lock()


def load_split(
    split: str,
    *,
    data_dir: str | Path | None = None,
    root: str | Path | None = None,
    download: bool = False,
    environ: Mapping[str, str] | None = None,
) -> Split:
    """The train or test split, from the first place that holds it (cached per process)."""
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    env = os.environ if environ is None else environ
    found = find_data_dir(data_dir=data_dir, root=root, environ=env)
    if found is None and download:
        found = _download(Path(root or DEFAULT_ROOT).expanduser())
    if found is None:
        raise TaskError(_not_found_message(candidate_dirs(data_dir, root, env)))
    with _cache_lock:
        key = (found.resolve(), split)
        if key not in _cache:
            _cache[key] = _read_split(found, split)
        return _cache[key]


def candidate_dirs(
    data_dir: str | Path | None, root: str | Path | None, environ: Mapping[str, str]
) -> list[Path]:
    """Where the IDX files are looked for, in order."""
    dirs = [Path(data_dir).expanduser()] if data_dir else []
    if environ.get(ENV_DATA_DIR):
        dirs.append(Path(environ[ENV_DATA_DIR]).expanduser())
    dirs.append(DEBIAN_DIR)
    dirs.append(Path(root or DEFAULT_ROOT).expanduser() / "FashionMNIST" / "raw")
    return dirs


def find_data_dir(
    *,
    data_dir: str | Path | None = None,
    root: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path | None:
    """The first candidate directory that holds all four files, or None."""
    env = os.environ if environ is None else environ
    for directory in candidate_dirs(data_dir, root, env):
        if all(_idx_path(directory, name) for split in _SPLITS.values() for name in split[:2]):
            return directory
    return None


def _idx_path(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _not_found_message(dirs: list[Path]) -> str:
    looked = "\n".join(f"  - {d}" for d in dirs)
    return f"Fashion-MNIST not found. Looked in:\n{looked}\n{_HOW_TO_GET}"


def _download(root: Path) -> Path:
    # Imported here: torchvision's datasets module is slow to import and rarely needed,
    # and torchvision is an optional extra.
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError as exc:
        raise TaskError(f"download=True needs torchvision ({exc}): pip install 'pwfl[vision]', "
                        f"or get the files another way. {_HOW_TO_GET}") from exc

    try:
        FashionMNIST(str(root), train=True, download=True)
    except Exception as exc:  # urllib, HTTP and archive errors alike
        raise TaskError(f"downloading Fashion-MNIST into {root} failed: {exc}") from exc
    return root / "FashionMNIST" / "raw"


def _read_split(directory: Path, split: str) -> Split:
    images_name, labels_name, count = _SPLITS[split]
    images = read_idx(_existing(directory, images_name), magic=_IMAGES_MAGIC)
    labels = read_idx(_existing(directory, labels_name), magic=_LABELS_MAGIC)
    if images.shape != (count, 28, 28) or labels.shape != (count,):
        raise TaskError(
            f"{directory}: {split} split has images {images.shape} and labels {labels.shape}, "
            f"expected ({count}, 28, 28) and ({count},)"
        )
    if int(labels.max()) > 9:
        raise TaskError(f"{directory}: {split} labels go up to {int(labels.max())}, expected 0..9")
    return Split(_normalised(images), torch.from_numpy(labels.astype(np.int64)))


def _existing(directory: Path, name: str) -> Path:
    path = _idx_path(directory, name)
    if path is None:
        raise TaskError(f"{directory}: {name} disappeared")
    return path


def _normalised(images: np.ndarray) -> torch.Tensor:
    pixels = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    return pixels.mul_(1 / (255 * STD)).sub_(MEAN / STD)


def read_idx(path: Path, *, magic: int) -> np.ndarray:
    """An IDX file of unsigned bytes as an array; TaskError if it is not a valid one."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise TaskError(f"{path}: cannot read: {exc}") from exc
    ndim = magic & 0xFF
    if len(raw) < 4 + 4 * ndim or struct.unpack_from(">I", raw)[0] != magic:
        raise TaskError(f"{path}: not an IDX file with magic number {magic:#010x}")
    shape = struct.unpack_from(f">{ndim}I", raw, 4)
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if len(raw) != expected:
        raise TaskError(f"{path}: {len(raw)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def dirichlet_partition(
    labels: np.ndarray | torch.Tensor, num_clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Split example indices among clients with Dirichlet(alpha) label proportions.

    Deterministic for a seed; every example lands in exactly one client and no
    client is empty. Smaller alpha gives more skewed label mixes per client.
    """
    labels = np.asarray(labels)
    if not 1 <= num_clients <= len(labels):
        raise ValueError(f"cannot split {len(labels)} examples among {num_clients} clients")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, not {alpha}")
    rng = np.random.default_rng(seed)
    for _ in range(10):  # resample: with sane alpha an empty client is rare
        owners = _draw_owners(labels, num_clients, alpha, rng)
        if np.bincount(owners, minlength=num_clients).min() > 0:
            break
    else:
        owners = _fill_empty(owners, num_clients, rng)
    order = np.argsort(owners, kind="stable")
    bounds = np.cumsum(np.bincount(owners, minlength=num_clients))[:-1]
    return [part.astype(np.int64) for part in np.split(order, bounds)]


def _draw_owners(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """For each example, the client that gets it."""
    owners = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for client, part in enumerate(np.split(members, cuts)):
            owners[part] = client
    return owners


def _fill_empty(owners: np.ndarray, num_clients: int, rng: np.random.Generator) -> np.ndarray:
    """Give each empty client one example taken from the largest client."""
    owners = owners.copy()
    counts = np.bincount(owners, minlength=num_clients)
    for client in np.flatnonzero(counts == 0):
        donor = int(np.argmax(counts))
        moved = rng.choice(np.flatnonzero(owners == donor))
        owners[moved] = client
        counts[donor] -= 1
        counts[client] += 1
    return owners
