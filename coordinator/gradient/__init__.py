"""Batch-gradient federation's server side (`--mode gradient`, `--gradient-slots N`).

`optimizer` holds the flat model and its server optimiser; a gradient slot's
sessions are `coordinator.slots.gradients`, run by the same slot lifecycle as
weight rounds. The agent's side is `client_agent.gradient`, the trainer's
`trainer_worker.gradient`, the wire `bus.gradient` and `serialization.gradient`.
"""
