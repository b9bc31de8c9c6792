"""Replay a PWFL run from its JSON event log: where the time went, accuracy over time,
and what-if schedules driven through the coordinator's own scheduling code.

    events    read a log (forgiving a crash's truncated line), `Event`
    timeline  events -> `model.Run` (slots, rounds, leases, coordinator work)
    summary   `Run` -> `RunSummary` (the numbers docs/replay.md documents)
    compare   several summaries side by side
    terminal  rich tables;  figures + report  PNG figures and the HTML page
    simulate  what-if discrete-event replay through coordinator.scheduling/quorum
    cli       `python -m replay`
"""
