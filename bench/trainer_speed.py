"""`python -m bench.trainer_speed`: training steps and evaluation speed of the default CNN.

One CPU thread (as a local trainer runs), Fashion-MNIST client 0's partition.
Each variant is measured against the current code in the same run: the variants
take turns (A B C ... A B C ...), a short burst of steps each, many times over, so
load from other processes falls on all of them alike; medians and the ratio to
`current` are printed.

Training variants (steps per second, SGD momentum 0.9, the job's batch size):
  current        trainer_worker.tasks.train_sgd's step: channels-last model,
                 torch.optim.SGD as the trainer builds it (fused=True, kept: 1.04-1.05x),
                 batches gathered by index
  nchw           the model left contiguous (NCHW) instead of channels-last
  sgd-for-loop   SGD(fused=False, foreach=False): the trainer's optimiser before
  sgd-foreach    SGD(foreach=True)
  epoch-gather   the epoch's examples gathered once in permuted order, batches are
                 slices of that (no per-step gather)
  compile        torch.compile(model); its compile time is reported separately
Evaluation variants (test-set passes per second): inference_mode against no_grad,
batch 100 (current; 250 before, measured 1.2-1.6x slower) against 64, 250 and 1000, and
NCHW against channels-last.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from trainer_worker import models
from trainer_worker.task import TrainConfig
from trainer_worker.tasks import Examples, _Stepper, evaluate_batches
from trainer_worker.tasks.fashion_mnist import FashionMnistTask


def _batches(data: Examples, indices: torch.Tensor, batch: int, seed: int,
             epoch_gather: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.Generator().manual_seed(seed)
    while True:
        perm = indices[torch.randperm(len(indices), generator=order)]
        if epoch_gather:
            inputs, labels = data.inputs[perm], data.labels[perm]
            yield from zip(torch.split(inputs, batch), torch.split(labels, batch), strict=True)
        else:
            for b in torch.split(perm, batch):
                yield data.inputs[b], data.labels[b]


class TrainVariant:
    """A model, optimiser and batch stream that advance `steps` at a time."""

    def __init__(self, data: Examples, indices: torch.Tensor, batch: int, *,
                 channels_last: bool = True, sgd: dict[str, Any] | None = None,
                 epoch_gather: bool = False, compile_model: bool = False) -> None:
        model = models.build("cnn", seed=0)
        if not channels_last:
            model = model.to(memory_format=torch.contiguous_format)
        config = TrainConfig(batch_size=batch, lr=0.01, momentum=0.9)
        self.stepper = _Stepper(model, config)
        if sgd:
            self.stepper.optimizer = torch.optim.SGD(self.stepper.params, lr=config.lr,
                                                     momentum=config.momentum, **sgd)
        self.compile_s = 0.0
        if compile_model:
            self.stepper.model = torch.compile(model)  # type: ignore[assignment]
        model.train()
        self.stream = _batches(data, indices, batch, 0, epoch_gather)
        if compile_model:
            began = time.perf_counter()
            self.step(2)  # first call compiles forward and backward
            self.compile_s = time.perf_counter() - began

    def step(self, steps: int) -> None:
        for _ in range(steps):
            inputs, labels = next(self.stream)
            self.stepper(inputs, labels)


def interleaved(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Median seconds per call of each function, called in turn `reps` times (1 warm-up)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(reps + 1):
        for name, fn in fns.items():
            began = time.perf_counter()
            fn()
            if rep:
                samples[name].append(time.perf_counter() - began)
    return {name: statistics.median(s) for name, s in samples.items()}


def train_speeds(data: Examples, indices: torch.Tensor, batch: int, burst: int, reps: int,
                 with_compile: bool) -> tuple[dict[str, float], float | None]:
    variants = {
        "current": TrainVariant(data, indices, batch),
        "nchw": TrainVariant(data, indices, batch, channels_last=False),
        "sgd-for-loop": TrainVariant(data, indices, batch,
                                     sgd={"foreach": False, "fused": False}),
        "sgd-foreach": TrainVariant(data, indices, batch, sgd={"foreach": True}),
        "epoch-gather": TrainVariant(data, indices, batch, epoch_gather=True),
    }
    compile_s = None
    if with_compile:
        try:
            variants["compile"] = TrainVariant(data, indices, batch, compile_model=True)
            compile_s = variants["compile"].compile_s
        except Exception as exc:  # noqa: BLE001 - no C compiler, unsupported platform...
            print(f"torch.compile unavailable: {exc}", file=sys.stderr)
    steppers: dict[str, Callable[[], Any]] = {
        name: functools.partial(variant.step, burst) for name, variant in variants.items()}
    secs = interleaved(steppers, reps)
    return {name: burst / s for name, s in secs.items()}, compile_s


def eval_speeds(test: Examples, reps: int) -> dict[str, float]:
    cl = models.build("cnn", seed=0)
    nchw = models.build("cnn", seed=0).to(memory_format=torch.contiguous_format)

    def no_grad_eval(model: nn.Module, batch: int) -> None:
        # evaluate_batches' loop with no_grad in place of inference_mode
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.int64)
        with torch.no_grad():
            for inputs, labels in zip(torch.split(test.inputs, batch),
                                      torch.split(test.labels, batch), strict=True):
                logits = model(inputs)
                loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
                correct += (logits.argmax(1) == labels).sum()

    fns: dict[str, Callable[[], Any]] = {
        "current (inference_mode, batch 100)": lambda: evaluate_batches(cl, test, 100),
        "no_grad, batch 100": lambda: no_grad_eval(cl, 100),
        "batch 64": lambda: evaluate_batches(cl, test, 64),
        "batch 250": lambda: evaluate_batches(cl, test, 250),
        "batch 1000": lambda: evaluate_batches(cl, test, 1000),
        "nchw, batch 100": lambda: evaluate_batches(nchw, test, 100),
    }
    return {name: 1 / s for name, s in interleaved(fns, reps).items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.trainer_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="16,32", help="training batch sizes (default 16,32)")
    p.add_argument("--reps", type=int, default=15, help="interleaved repetitions (default 15)")
    p.add_argument("--burst", type=int, default=10, help="steps per repetition (default 10)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--quick", action="store_true", help="3 repetitions, batch 16 only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    reps = 3 if args.quick else args.reps
    sizes = [16] if args.quick else [int(b) for b in args.batch_sizes.split(",")]
    task = FashionMnistTask()
    train = task.train_examples()
    data = Examples(train.inputs, train.labels)
    indices = task.client_indices(0)
    summary: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    for batch in sizes:
        speeds, compile_s = train_speeds(data, indices, batch, args.burst, reps,
                                         not args.no_compile)
        print(f"training, batch {batch}, 1 thread (steps/s, median of {reps}):")
        for name, sps in speeds.items():
            print(f"  {name:14} {sps:8.1f}  {sps / speeds['current']:5.2f}x")
            summary[f"train_b{batch}_{name}_steps_per_s"] = round(sps, 2)
        if compile_s is not None:
            gain = 1 / speeds["current"] - 1 / speeds.get("compile", speeds["current"])
            pays_after = compile_s / gain if gain > 0 else None
            print(f"  compile time {compile_s:.1f} s; pays back after "
                  f"{'never' if pays_after is None else f'{pays_after:.0f} steps'}")
            summary[f"train_b{batch}_compile_s"] = round(compile_s, 2)
            summary[f"train_b{batch}_compile_payback_steps"] = (
                None if pays_after is None else round(pays_after))
    test = task.test_examples()
    evals = eval_speeds(Examples(test.inputs, test.labels), max(3, reps // 3))
    base = next(iter(evals.values()))
    print("evaluation of the 10,000-image test set, 1 thread (passes/s):")
    for name, per_s in evals.items():
        print(f"  {name:38} {per_s:6.2f}  {per_s / base:5.2f}x")
        summary[f"eval_{name}_per_s"] = round(per_s, 3)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
