"""The testbed's profiles: one frozen table of links and emulated devices.

A profile fixes, for every silo, the link to the host (bandwidth each way, shaped
by the kernel's `tbf`; round-trip time, added by the delaying relay) and the
device (a slowdown k: the silo's device takes k times the nominal step time).
Speeds are slowdowns because only slower-than-nominal devices can be emulated by
padding: speed 1 is already set above what a step needs on the shared cores.
"""

from __future__ import annotations

from dataclasses import dataclass

SILOS = 6
# Nominal seconds per training step at speed 1, per model. CNN: a batch-32 step of the
# Fashion-MNIST CNN takes ~9 ms on an idle core and ~3-4x that with six trainers on two
# shared cores; 60 ms stays above it. ResNet-18-sized: no-op compute (the 45 MB state
# dict is what matters), padded to a nominal step of a small accelerator.
STEP_S = {"cnn": 0.06, "resnet18": 0.25}


@dataclass(frozen=True)
class Profile:
    """Every silo's link and device in one regime."""

    name: str
    rate_mbit: float | None  # each direction of each silo's link; None: unshaped
    rtt_ms: float  # added by the relay, half each way; 0: no delay
    slowdowns: tuple[float, ...] = (1.0,) * SILOS  # one per silo: speed 1/k
    summary: str = ""
    clients_per_silo: int = 1  # each silo's agent hosts this many clients (one device each)

    @property
    def one_way_delay_s(self) -> float:
        return self.rtt_ms / 2000

    @property
    def silos(self) -> int:
        return len(self.slowdowns)

    @property
    def clients(self) -> int:
        return self.silos * self.clients_per_silo

    def describe(self) -> str:
        rate = "unshaped" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s each way"
        speeds = ",".join(f"{k:g}" for k in self.slowdowns)
        return (f"{self.name}: {self.silos} silos x {self.clients_per_silo} client(s), {rate}, "
                f"+{self.rtt_ms:g} ms RTT, "
                f"device slowdowns {speeds} (EMULATION: training padded to nominal step times)")


HETERO = (1.0, 1.0, 1.0, 2.0, 4.0, 4.0)
PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("loopback", None, 0.0, summary="today's single machine: veths unshaped, no delay"),
    Profile("lan", 1000.0, 1.0, summary="silos on one campus: 1 Gbit/s, ~1 ms"),
    Profile("wan", 100.0, 40.0, summary="silos across a country: 100 Mbit/s, ~40 ms RTT"),
    Profile("slow-wan", 20.0, 100.0, summary="thin links: 20 Mbit/s, ~100 ms RTT"),
    Profile("hetero", 100.0, 40.0, HETERO,
            summary="wan links, devices of speeds 1,1,1,1/2,1/4,1/4"),
    Profile("slow-hetero", 20.0, 100.0, HETERO,
            summary="slow-wan links, devices of speeds 1,1,1,1/2,1/4,1/4"),
    Profile("wan-3x2", 100.0, 40.0, (1.0,) * (SILOS // 2), clients_per_silo=2,
            summary="wan links, 3 silos of 2 clients each: a model crosses a link once per "
                    "silo for PWFL (agent cache), once per client for Flower"),
)}


def profile(name: str) -> Profile:
    """The profile called `name`; KeyError names the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None
