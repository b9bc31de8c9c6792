"""An emulated cross-silo testbed on one machine (root): where several slots may pay off.

Each silo is a network namespace joined to the host by a veth pair, shaped by the
kernel in both directions (`tbf`), with latency added by a delaying TCP relay on the
host side (this kernel has no `netem`), and an emulated device (training calls padded
with sleep to a nominal time: `trainer_worker.emulation`). Redis, the coordinator and
Flower's SuperLink stay on the host; agents and SuperNodes run inside the silos.

    profiles  the regimes: links and device slowdowns, one frozen table
    netns     namespaces, veth pairs, tbf, counters, leftovers by name
    relay     the delaying relay (an event loop in a daemon thread)
    bed       `Testbed`: up for a `with` block, gone on every exit path
    silos     PWFL's agents in the silos, and what their logs say about emulation
    measure   what the relay adds (RTT, throughput) against a direct connection
    cli       `python -m bench.testbed up|down|status|run|measure`
"""

from bench.testbed.bed import Silo, Testbed
from bench.testbed.netns import TestbedError
from bench.testbed.profiles import PROFILES, Profile, profile

__all__ = ["PROFILES", "Profile", "Silo", "Testbed", "TestbedError", "profile"]
