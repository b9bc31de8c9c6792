"""Slots that differ and cooperate: per-slot configuration, PBT and merging.

- `config`: what each slot trains with (`--slot-config FILE`, `--sweep KEY=V1,V2`),
  resolved against the command line and validated before anything starts.
- `pbt`: population-based training's decisions (exploit, explore), pure.
- `merge`: weighted averages of slot models and the greedy soup, pure.
- `hooks`: the slot loop's round-boundary hook that applies them to running slots.

    ConfigError(ValueError)   a slot's configuration is unknown, malformed or too large
"""
