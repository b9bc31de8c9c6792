"""``--merge final``: at the end, the plain average and a greedy soup of the slots.

The candidates are every slot's last model, their uniform average and a greedy soup
(Wortsman et al., 2022: the slots best first, each kept only if the soup's score does
not drop with it). Every candidate is scored on validation data: the clients'
held-out validation splits, by federated evaluation (`slots.scoring.FederatedScorer`, one
validate-only job per live client and candidate), so the choice never reads the test
set. The kept model is then evaluated once on the test set, and that is the accuracy
reported; it is written to ``checkpoints/result.pwfl`` (served by
``GET /runs/{run}/result``), and one `final_merge` event says what was tried and kept
(``final_candidate_validated`` for each score).

A run that evaluates centrally alone (``--eval central``) has no validation figures:
its candidates are scored on the test set, and the event says so with
``selected_on: "test set"`` (an optimistic estimate, as the choice saw the test set).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch

from coordinator.checkpoints import CheckpointStore
from coordinator.population import merge
from coordinator.results.figures import Validation
from serialization import encode

log = structlog.get_logger()
State = dict[str, torch.Tensor]
Score = Callable[[str, State], Awaitable[Validation | None]]


@dataclass
class Selection:
    """What `select` tried and kept."""

    kept: str
    state: State
    score: float
    scores: dict[str, float] = field(default_factory=dict)  # candidate -> its score
    soup_members: tuple[int, ...] = ()
    soup_tried: list[tuple[int, float]] = field(default_factory=list)


async def select(finals: dict[int, State], score: Score) -> Selection | None:
    """Score every slot's model, the average and the greedy soup with `score` (None: a
    candidate nobody could score, never kept); the best; None if nothing was scored."""
    scores: dict[str, float] = {}
    states: dict[str, State] = {}

    async def scored(name: str, state: State) -> float | None:
        validation = await score(name, state)
        if validation is not None:
            scores[name], states[name] = validation.accuracy, state
        return None if validation is None else validation.accuracy

    own = {s: await scored(f"slot {s}", finals[s]) for s in sorted(finals)}
    ranked = sorted((s for s in own if own[s] is not None), key=lambda s: (-own[s], s))  # type: ignore[operator]
    if not ranked:
        return None
    average = await asyncio.to_thread(merge.weighted_average, [finals[s] for s in sorted(finals)],
                                      [1.0] * len(finals))
    await scored("average", average)
    members, soup_score, tried = [ranked[0]], own[ranked[0]], []
    soup = finals[ranked[0]]
    for candidate in ranked[1:]:
        trial = await asyncio.to_thread(merge.weighted_average,
                                        [finals[m] for m in [*members, candidate]],
                                        [1.0] * (len(members) + 1))
        trial_score = await scored(f"soup +{candidate}", trial)
        if trial_score is None:
            continue
        tried.append((candidate, trial_score))
        if trial_score >= soup_score:  # type: ignore[operator]
            members, soup, soup_score = [*members, candidate], trial, trial_score
    if len(members) > 1:
        scores["soup"], states["soup"] = float(soup_score or 0.0), soup
    kept = max(scores, key=lambda k: (scores[k], k == "soup", k == "average"))
    return Selection(kept, states[kept], scores[kept], scores, tuple(members), tried)


async def run_final_merge(finals: dict[int, State], score: Score, selected_on: str,
                          test: Callable[[State], Awaitable[dict[str, float]]] | None,
                          checkpoints: CheckpointStore) -> Path | None:
    """Select, evaluate the kept model once on the test set (`test`; None: the run has no
    central evaluation), keep it as the run's result; None with fewer than 2 slots."""
    if len(finals) < 2:
        return None
    selection = await select(finals, score)
    if selection is None:
        log.warning("final_merge_skipped", slot_id="merged",
                    reason="no candidate could be scored (no client reported validation figures)")
        return None
    tested = await test(selection.state) if test is not None else {}
    path = checkpoints.run_dir / "checkpoints" / "result.pwfl"
    payload = await asyncio.to_thread(encode, selection.state)
    await asyncio.to_thread(_write, path, payload)
    own = {k: v for k, v in selection.scores.items() if k.startswith("slot ")}
    best_slot = max(own, key=lambda k: own[k]) if own else None
    log.info("final_merge", slot_id="merged", path=str(path), kept=selection.kept,
             selected_on=selected_on, validation_accuracy=selection.score,
             accuracy=tested.get("accuracy"), loss=tested.get("loss"),
             average_accuracy=selection.scores.get("average"),
             soup_accuracy=selection.scores.get("soup"),
             soup_members=list(selection.soup_members),
             soup_tried=[[s, a] for s, a in selection.soup_tried],
             best_slot_id=None if best_slot is None else int(best_slot.split()[1]),
             best_slot_accuracy=None if best_slot is None else own[best_slot],
             scores=selection.scores)
    return path


def _write(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    tmp.replace(path)
