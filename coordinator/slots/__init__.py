"""Slots: the one lifecycle every slot runs, and the two kinds of round behind it.

    lifecycle.py   `Slot`: lease, open, collect, close, evaluate and checkpoint (behind),
                   population hook, give up and retire, late results, drop after finish
    protocol.py    `RoundProtocol`: what a kind of round does (open, take what arrives,
                   when it is over, close)
    weights.py     weight rounds: publish the model, fold updates under a quorum
    gradients.py   gradient sessions: one server optimiser step per gathered step
    chain.py       the evaluate-and-checkpoint chain behind a slot's rounds
    publishing.py  what a slot publishes: its model (blob, shared memory) and its jobs
    published.py   which model each slot serves now (blobs are never retired under it)
    registry.py    the run's one map of slots: routing results, lost clients' jobs
    factory.py     building slots from the run's services; a weight slot's population seat
"""
