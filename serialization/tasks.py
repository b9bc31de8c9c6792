"""The built-in task specs: the coordinator's short `--task` names, and the tasks every
agent runs without being told (`--allow-task` adds more).

Here, not in `trainer_worker`, because the coordinator never imports the trainer
package and the agent never imports the coordinator; both import `serialization`.
"""

from __future__ import annotations

from types import MappingProxyType

BUILTIN_TASKS = MappingProxyType({
    "fashion_mnist": "trainer_worker.tasks.fashion_mnist:FashionMnistTask",
    "synthetic": "trainer_worker.tasks.synthetic:SyntheticTask",
})


def task_spec(name: str) -> str:
    """The import path of a built-in task's short name; any other name unchanged."""
    return BUILTIN_TASKS.get(name, name)
