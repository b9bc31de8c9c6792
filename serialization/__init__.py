"""Wire formats: state dicts as header + raw tensor bytes, and the stream messages.

Imports no other package of ours. Everything that reads untrusted bytes raises
`PayloadError` (with a `reason` label) and nothing else.
"""

import warnings

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

# Decoded tensors are read-only views over received bytes by contract (zero-copy
# decode, `tensors.decode`); torch can only warn that it cannot mark them read-only.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
