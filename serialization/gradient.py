"""Headers of the batch-gradient federation entries (`bus.gradient`).

The body beside each header is a flat float32 vector of the model's parameters
(weights going down, one batch's gradient coming up), in `named_parameters`
order; `numel` and `layout` (a fingerprint of names and shapes) let the reader
check it before using a byte of it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from serialization.errors import PayloadError
from serialization.messages import Message


@dataclass(frozen=True)
class StepWeights(Message):
    """The slot's weights for step `step` of session `session` (the body)."""

    kind: ClassVar[str] = "step_weights"
    session: str
    step: int
    numel: int
    layout: int


@dataclass(frozen=True)
class StepGradient(Message):
    """One client's gradient of one batch at step `step` (the body), or its failure."""

    kind: ClassVar[str] = "step_gradient"
    session: str
    step: int
    job_id: str
    client_id: str
    num_examples: int
    numel: int
    loss: float = 0.0
    agent_id: str = ""
    timings: dict[str, Any] = field(default_factory=dict)
    # With client keys (`serialization.signing`): the body's sha256, and the client's HMAC
    # over session, step, job, client, example count, size and that digest.
    digest: str = ""
    signature: bytes = b""


def flat_view(body: bytes | memoryview, numel: int) -> np.ndarray:
    """The body as float32 (a view, no copy); PayloadError unless it holds exactly `numel`
    finite values."""
    if len(body) != numel * 4:
        raise PayloadError("bad_size", f"{len(body)} bytes for {numel} float32 values")
    values = np.frombuffer(body, dtype=np.float32)
    if not np.isfinite(values).all():
        raise PayloadError("not_finite", "NaN or Inf in a gradient")
    return values


def layout_digest(named_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> int:
    """A fingerprint of the parameters' names and shapes, in flat-vector order: both ends
    must agree on it before any bytes are read as weights or gradients."""
    text = ";".join(f"{name}:{tuple(shape)}" for name, shape in named_shapes)
    return zlib.crc32(text.encode())
