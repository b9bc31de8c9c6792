"""How fast state dicts become bytes, come back, and travel through Redis.

``python -m bench.serialization`` measures, for a torchvision ResNet-18 (46.8 MB)
and the ~582k-parameter CNN (2.3 MB), each against a plain copy of the same
number of bytes made in the same run:

- encode, three ways, each beside its like-for-like memcpy: `encode_into` into
  a reused buffer (vs numpy copy into a preallocated array), `encode_buffer`
  into fresh memory (vs numpy copy into a fresh array) and `encode` into a
  fresh ``bytes`` (vs ``bytes(array)``, which pays the same 4 KiB page faults);
- decode (header and schema validated, views built; no finite check) and, on
  its own, the finite check;
- raw redis-py SET / GET against BlobStore.put / get of the same payload, on
  one client of a private redis-server listening on a unix socket.

It prints a table, then one JSON line (ResNet-18 under the plain keys, the CNN
under ``cnn_*``). ``--quick`` runs few repetitions, for a smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from bench._measure import Timing, ameasure_all, measure_all
from bus.blobs import DEFAULT_CHUNK_BYTES, DEFAULT_PARALLEL, BlobStore, digest_of
from bus.connection import connect
from bus.embedded import EmbeddedRedis
from bus.keys import Keys
from serialization import check_finite, decode, encode, encode_into, schema_of
from serialization.tensors import encode_buffer

GOALS = {"encode_vs_memcpy": 0.7, "decode_vs_memcpy": 5.0, "blob_put_vs_raw": 0.9,
         "blob_get_vs_raw": 0.9}


class Cnn(nn.Module):
    """The seeds' Fashion-MNIST CNN: 582,026 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5)
        self.conv2 = nn.Conv2d(32, 64, 5)
        self.fc1 = nn.Linear(64 * 4 * 4, 512)
        self.fc2 = nn.Linear(512, 10)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def models() -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return {
        "resnet18": torchvision.models.resnet18(weights=None).state_dict(),
        "cnn": Cnn().state_dict(),
    }


def measure_codec(state: dict[str, torch.Tensor], reps: int, warmup: int) -> dict[str, Timing]:
    """Encode, decode, finite check and the memcpy baselines, for one state dict."""
    payload = encode(state)
    src = np.frombuffer(payload, dtype=np.uint8)
    dst = np.empty_like(src)
    reused = bytearray(len(payload))
    schema = schema_of(state)
    decoded, _ = decode(payload, schema=schema)
    runs: dict[str, Callable[[], Any]] = {
        "memcpy": lambda: np.copyto(dst, src),
        "memcpy_fresh": src.copy,
        "memcpy_fresh_bytes": lambda: bytes(src),
        "encode": lambda: encode_into(state, reused),
        "encode_fresh": lambda: encode_buffer(state),
        "encode_bytes": lambda: encode(state),
        "decode": lambda: decode(payload, schema=schema),
        "finite_check": lambda: check_finite(decoded),
        "decode_finite": lambda: decode(payload, schema=schema, finite=True),
        "sha256": lambda: digest_of(payload),
    }
    return measure_all(runs, reps=reps, warmup=warmup, warm_each=True)


async def measure_redis(
    payloads: dict[str, bytes], reps: int, warmup: int
) -> dict[str, dict[str, Timing]]:
    """Raw SET / GET and BlobStore.put / get of each payload, on one client."""
    with EmbeddedRedis(unix_socket=True) as server:
        client = connect(server.url)
        try:
            keys = Keys(run_id="bench")
            store = BlobStore(client, keys)
            return {name: await _redis_pair(client, store, keys.blob("raw"), data, reps, warmup)
                    for name, data in payloads.items()}
        finally:
            await client.aclose()


async def _redis_pair(
    client: Any, store: BlobStore, raw_key: str, data: bytes, reps: int, warmup: int
) -> dict[str, Timing]:
    digest = digest_of(data)
    ref = await store.put(data, digest)

    async def drop() -> None:  # a put of stored bytes only refreshes the TTL: start empty
        await client.unlink(raw_key)
        await store.delete(ref)

    writes = {
        "redis_set": lambda: client.set(raw_key, data),
        "blob_put": lambda: store.put(data, digest),
        "blob_put_hashing": lambda: store.put(data),
    }
    timings = await ameasure_all(writes, reps=reps, warmup=warmup, setup=drop)
    await client.set(raw_key, data)
    await store.put(data, digest)
    reads = {"redis_get": lambda: client.get(raw_key), "blob_get": lambda: store.get(ref)}
    timings |= await ameasure_all(reads, reps=reps, warmup=warmup)
    await drop()
    return timings


def summary(nbytes: int, t: dict[str, Timing]) -> dict[str, float]:
    """The JSON figures of one model (GB/s and ratios, 3 decimals)."""
    g = {name: timing.gbps(nbytes) for name, timing in t.items()}
    out = {
        "mb": nbytes / 1e6,
        "memcpy_gbps": g["memcpy"],
        "memcpy_fresh_gbps": g["memcpy_fresh"],
        "memcpy_fresh_bytes_gbps": g["memcpy_fresh_bytes"],
        "encode_gbps": g["encode"],
        "encode_vs_memcpy": g["encode"] / g["memcpy"],
        "encode_fresh_gbps": g["encode_fresh"],
        "encode_fresh_vs_memcpy_fresh": g["encode_fresh"] / g["memcpy_fresh"],
        "encode_bytes_gbps": g["encode_bytes"],
        "encode_bytes_vs_memcpy_fresh_bytes": g["encode_bytes"] / g["memcpy_fresh_bytes"],
        "encode_bytes_vs_memcpy_fresh": g["encode_bytes"] / g["memcpy_fresh"],
        "decode_gbps": g["decode"],
        "decode_vs_memcpy": g["decode"] / g["memcpy"],
        "decode_ms": t["decode"].median_s * 1e3,
        "finite_check_gbps": g["finite_check"],
        "decode_finite_gbps": g["decode_finite"],
        "sha256_gbps": g["sha256"],
    }
    if "redis_set" in g:
        out |= {
            "redis_set_gbps": g["redis_set"],
            "redis_get_gbps": g["redis_get"],
            "blob_put_gbps": g["blob_put"],
            "blob_get_gbps": g["blob_get"],
            "blob_put_vs_raw": g["blob_put"] / g["redis_set"],
            "blob_get_vs_raw": g["blob_get"] / g["redis_get"],
            "blob_put_hashing_vs_raw": g["blob_put_hashing"] / g["redis_set"],
        }
    return {k: round(v, 3) for k, v in out.items()}


ROWS = [  # (timing name, what it is, like-for-like baseline or "")
    ("memcpy", "numpy copy into a preallocated array", ""),
    ("memcpy_fresh", "numpy copy into a fresh array (huge pages)", ""),
    ("memcpy_fresh_bytes", "bytes(array): copy into a fresh bytes object", ""),
    ("encode", "encode_into a reused bytearray", "memcpy"),
    ("encode_fresh", "encode_buffer (fresh numpy buffer)", "memcpy_fresh"),
    ("encode_bytes", "encode -> bytes", "memcpy_fresh_bytes"),
    ("decode", "decode: header + schema checked, views", "memcpy"),
    ("finite_check", "check_finite on the decoded views", "memcpy"),
    ("decode_finite", "decode(finite=True)", "memcpy"),
    ("sha256", "hashlib.sha256 (the blob digest)", "memcpy"),
    ("redis_set", "redis-py SET (unix socket)", ""),
    ("blob_put", "BlobStore.put, digest given", "redis_set"),
    ("blob_put_hashing", "BlobStore.put, digest computed", "redis_set"),
    ("redis_get", "redis-py GET (unix socket)", ""),
    ("blob_get", "BlobStore.get", "redis_get"),
]


def print_table(name: str, nbytes: int, t: dict[str, Timing]) -> None:
    print(f"\n{name}: {nbytes / 1e6:.1f} MB payload, median of {t['memcpy'].reps} runs")
    print(f"  {'operation':46} {'median ms':>10} {'min ms':>8} {'GB/s':>7}  {'vs baseline':>20}")
    for key, label, base in ROWS:
        if key not in t:
            continue
        timing = t[key]
        ratio = f"{t[base].median_s / timing.median_s:.2f}x {base}" if base else ""
        print(f"  {label:46} {timing.median_s * 1e3:10.3f} {timing.min_s * 1e3:8.3f} "
              f"{timing.gbps(nbytes):7.2f}  {ratio:>20}")


def print_goals(figures: dict[str, float]) -> None:
    print("\ngoals (ResNet-18):")
    for key, goal in GOALS.items():
        if key in figures:
            verdict = "met" if figures[key] >= goal else "MISSED"
            print(f"  {key:18} {figures[key]:7.2f}x  goal >= {goal}x  {verdict}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.serialization",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repetitions: a smoke test")
    parser.add_argument("--reps", type=int, default=21, help="timed repetitions (codec)")
    parser.add_argument("--redis-reps", type=int, default=9, help="timed repetitions (Redis)")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis part")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps, redis_reps, warmup = (2, 1, 0) if args.quick else (args.reps, args.redis_reps, 1)
    states = models()
    payloads = {name: encode(state) for name, state in states.items()}
    timings = {name: measure_codec(state, reps, warmup) for name, state in states.items()}
    if not args.no_redis:
        for name, extra in asyncio.run(measure_redis(payloads, redis_reps, warmup)).items():
            timings[name] |= extra
    print(f"PWFL serialization bench: torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; BlobStore chunks of "
          f"{DEFAULT_CHUNK_BYTES >> 20} MiB on up to {DEFAULT_PARALLEL} connections")
    for name in states:
        print_table(name, len(payloads[name]), timings[name])
    figures = summary(len(payloads["resnet18"]), timings["resnet18"])
    print_goals(figures)
    cnn = summary(len(payloads["cnn"]), timings["cnn"])
    figures |= {f"cnn_{k}": v for k, v in cnn.items()}
    print(json.dumps({
        **figures,
        "torch_threads": torch.get_num_threads(),
        "encode_api": "encode_into (reused buffer) vs numpy copy into a preallocated array",
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
