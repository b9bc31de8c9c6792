"""Wire formats: state dicts as header + raw tensor bytes, and the stream messages.

Imports no other package of ours. Everything that reads untrusted bytes raises
`PayloadError` (with a `reason` label) and nothing else.

The tensor names (`encode`, `decode`, ...) are imported on first use: the messages
and the event types (`slot_events`) must stay importable without torch, since the
replay tool reads logs on machines that have none.
"""

from typing import TYPE_CHECKING, Any

from serialization.errors import PayloadError
from serialization.messages import (
    SCHEMA_VERSION,
    AnyJob,
    GradientJob,
    Job,
    Message,
    Registration,
    Result,
    job_from_bytes,
)

if TYPE_CHECKING:
    from serialization.tensors import (
        DTYPES,
        TensorSpec,
        check_finite,
        decode,
        encode,
        encode_into,
        encoded_size,
        read_header,
        schema_of,
    )

_TENSOR_NAMES = frozenset({"DTYPES", "TensorSpec", "check_finite", "decode", "encode",
                           "encode_into", "encoded_size", "read_header", "schema_of"})


def __getattr__(name: str) -> Any:
    if name in _TENSOR_NAMES:
        from serialization import tensors

        return getattr(tensors, name)
    raise AttributeError(f"module 'serialization' has no attribute {name!r}")


__all__ = [
    "DTYPES",
    "SCHEMA_VERSION",
    "AnyJob",
    "GradientJob",
    "Job",
    "Message",
    "PayloadError",
    "Registration",
    "Result",
    "TensorSpec",
    "check_finite",
    "decode",
    "encode",
    "encode_into",
    "encoded_size",
    "job_from_bytes",
    "read_header",
    "schema_of",
]
