"""Trainer processes and task plugins: local training, knowing nothing of Redis.

- `task`: the plugin contract (`Task`, `TrainConfig`, `TrainOutcome`, `load_task`).
- `tasks`: built-in tasks (Fashion-MNIST, synthetic blobs) and their shared loop.
- `data`: Fashion-MNIST IDX loading and the Dirichlet client partition.
- `models`: the built-in models (the 582k CNN, a tiny MLP, ResNet-18).
- `worker`: the trainer process entry point (`run`), spawned by the agent.
- `protocol`, `shm`: the agent <-> trainer messages and shared-memory helpers.
"""
