"""Messages between an agent and its trainer processes (msgpack over a Pipe).

Agent -> trainer::

    {"op": "train", "job_id", "client_id", "task", "task_options", "config",
     "model_shm", "model_nbytes", "model_digest"}
    {"op": "describe", "task", "task_options", "client_ids"}
    {"op": "stop"}

Trainer -> agent::

    {"op": "ready", "device", "pid"}
    {"op": "done", "job_id", "status": "ok", "update_shm", "update_nbytes",
     "num_examples", "metrics", "timings": {"load_s", "train_s", "encode_s"}}
    {"op": "done", "job_id", "status": "failed", "error"}
    {"op": "described", "status": "ok", "num_examples": {client_id: partition size}}
    {"op": "described", "status": "failed", "error"}

The model segment belongs to the agent (one per model digest, shared by all
its trainers); the update segment is created by the trainer and handed over:
the agent unlinks it after uploading. Pipes carry only these small msgpack
maps (`send_bytes` / `recv_bytes`), never pickles.
"""

from __future__ import annotations

from typing import Any

import msgpack


def pack(message: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


def unpack(raw: bytes) -> dict[str, Any]:
    message = msgpack.unpackb(raw, raw=False)
    if not isinstance(message, dict) or "op" not in message:
        raise ValueError("trainer message is not a map with an 'op'")
    return message
