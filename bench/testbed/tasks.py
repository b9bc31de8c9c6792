"""Tasks for throughput runs (the testbed's, `bench.round_overhead`): a big state dict on
the links, next to no compute.

`--noop-training` returns the received weights untouched, so an update has the same
bytes, hence the same digest, as the model it came from, and the content-addressed
blob store never uploads it (`BlobStore.put` finds it stored). A throughput run over
shaped links must move every update, so `PerturbedNoopTask` "trains" by changing one
value of the first parameter (a new digest per client and round, no real compute);
the emulated device pads the call to its nominal time as for real training.
"""

from __future__ import annotations

import torch

from trainer_worker.task import TrainConfig, TrainOutcome
from trainer_worker.tasks.synthetic import SyntheticTask

SPEC = "bench.testbed.tasks:PerturbedNoopTask"


class PerturbedNoopTask(SyntheticTask):
    """The synthetic task's model (e.g. `model=resnet18`), whose training moves one value."""

    def train(self, model: torch.nn.Module, client_id: str, config: TrainConfig,
              device: torch.device) -> TrainOutcome:
        with torch.no_grad():
            first = next(model.parameters())
            first.view(-1)[0] += 1e-3 * (1 + int(client_id))
        steps = config.local_steps or config.max_steps or 1
        return TrainOutcome(num_examples=steps * config.batch_size)

