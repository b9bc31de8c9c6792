"""Model download: a slot's latest aggregate (or a kept checkpoint) as safetensors or PWFL.

`GET /slots/{slot_id}/model` answers with the newest global model of the slot,
by default as safetensors (what PyTorch, Hugging Face and most tools load:
`safetensors.torch.load_file`), with `?format=pwfl` as PWFL's own wire format
(the bytes the clients received) and with `?round=R` a round still kept on disk.
The headers say which: ``X-PWFL-Slot``, ``X-PWFL-Round`` and ``X-PWFL-Digest``
(sha256 of the body). Decoding and encoding run in a worker thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import structlog
import torch
from aiohttp import web

from coordinator.checkpoints import CheckpointStore
from serialization import decode, encode

log = structlog.get_logger()
FORMATS = ("safetensors", "pwfl")
_ROUND_FILE = re.compile(r"^round(\d+)\.pwfl$")


@dataclass(frozen=True)
class LatestModel:
    """A slot's newest aggregate: the round it closed (0: the initial model), its state and,
    where already encoded, its wire bytes."""

    round: int
    state: dict[str, torch.Tensor]
    payload: bytes | None


ModelSource = Callable[[int], LatestModel | None]


def _body(model: LatestModel, fmt: str, metadata: dict[str, str]) -> bytes:
    """Blocking (a worker thread): the model in the asked format."""
    payload = model.payload if model.payload is not None else encode(model.state)
    if fmt == "pwfl":
        return bytes(payload)
    state = {name: tensor.contiguous() for name, tensor in decode(payload)[0].items()}
    return safetensors.torch.save(state, metadata=metadata)


def _checkpoint(store: CheckpointStore, slot_id: int, round_: int) -> LatestModel | None:
    path = store.model_path(slot_id, round_)
    return LatestModel(round_, {}, path.read_bytes()) if path.exists() else None


async def model_response(request: web.Request, latest: ModelSource, store: CheckpointStore | None,
                         run_id: str) -> web.Response:
    """The answer to GET /slots/{slot_id}/model (the caller checked the token)."""
    fmt = request.query.get("format", "safetensors")
    if fmt not in FORMATS:
        raise web.HTTPBadRequest(text=f"format must be one of {', '.join(FORMATS)}")
    try:
        slot_id = int(request.match_info["slot_id"])
        wanted = int(request.query["round"]) if "round" in request.query else None
    except ValueError:
        raise web.HTTPBadRequest(text="slot id and round are integers") from None
    model = latest(slot_id)
    if model is not None and wanted is not None and wanted != model.round:
        model = (None if store is None
                 else await asyncio.to_thread(_checkpoint, store, slot_id, wanted))
    if model is None:
        raise web.HTTPNotFound(text="no such slot or round")
    metadata = {"run_id": run_id, "slot_id": str(slot_id), "round": str(model.round)}
    body = await asyncio.to_thread(_body, model, fmt, metadata)
    digest = await asyncio.to_thread(lambda: hashlib.sha256(body).hexdigest())
    name = f"{run_id}-slot{slot_id}-round{model.round:05d}.{fmt}"
    log.info("model_downloaded", slot_id=slot_id, round=model.round, format=fmt,
             nbytes=len(body), digest=digest, remote=request.remote)
    return web.Response(body=body, content_type="application/octet-stream", headers={
        "X-PWFL-Slot": str(slot_id), "X-PWFL-Round": str(model.round),
        "X-PWFL-Digest": digest, "Content-Disposition": f'attachment; filename="{name}"'})


def kept_checkpoints(store: CheckpointStore) -> list[dict[str, Any]]:
    """Blocking: every model checkpoint on disk, by slot and round, with its size."""
    root = store.run_dir / "checkpoints"
    kept = []
    for folder in sorted(root.glob("slot*")):
        if not folder.name[4:].isdigit():
            continue
        for path in sorted(folder.iterdir()):
            match = _ROUND_FILE.match(path.name)
            if match:
                kept.append({"slot_id": int(folder.name[4:]), "round": int(match.group(1)),
                             "nbytes": path.stat().st_size, "mtime": path.stat().st_mtime,
                             "download": f"/slots/{int(folder.name[4:])}/model"
                                         f"?round={int(match.group(1))}"})
    return kept


async def checkpoints_response(request: web.Request, store: CheckpointStore | None,
                               run_id: str) -> web.Response:
    """The answer to GET /runs/{run_id}/checkpoints (the caller checked the token)."""
    if request.match_info["run_id"] != run_id or store is None:
        raise web.HTTPNotFound(text="no such run here")
    kept = await asyncio.to_thread(kept_checkpoints, store)
    return web.json_response({"run_id": run_id, "keep": store.keep, "checkpoints": kept})


def _result(store: CheckpointStore) -> LatestModel | None:
    path = store.run_dir / "checkpoints" / "result.pwfl"
    return LatestModel(0, {}, path.read_bytes()) if path.exists() else None


async def result_response(request: web.Request, store: CheckpointStore | None,
                          run_id: str) -> web.Response:
    """The answer to GET /runs/{run_id}/result (the caller checked the token): the model
    `--merge final` kept (checkpoints/result.pwfl), as safetensors or ``?format=pwfl``;
    404 until the run has one."""
    fmt = request.query.get("format", "safetensors")
    if fmt not in FORMATS:
        raise web.HTTPBadRequest(text=f"format must be one of {', '.join(FORMATS)}")
    if request.match_info["run_id"] != run_id or store is None:
        raise web.HTTPNotFound(text="no such run here")
    model = await asyncio.to_thread(_result, store)
    if model is None:
        raise web.HTTPNotFound(text="this run has no final model (yet): --merge final keeps "
                                    "one when the run ends")
    metadata = {"run_id": run_id, "slot_id": "merged"}
    body = await asyncio.to_thread(_body, model, fmt, metadata)
    digest = await asyncio.to_thread(lambda: hashlib.sha256(body).hexdigest())
    log.info("model_downloaded", slot_id="merged", round=None, format=fmt, nbytes=len(body),
             digest=digest, remote=request.remote)
    return web.Response(body=body, content_type="application/octet-stream", headers={
        "X-PWFL-Slot": "merged", "X-PWFL-Digest": digest,
        "Content-Disposition": f'attachment; filename="{run_id}-result.{fmt}"'})
