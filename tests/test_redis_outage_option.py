"""--redis-outage-s: both command lines take it, and local agents inherit the coordinator's."""

from __future__ import annotations

from bus.connection import DEFAULT_OUTAGE_S
from client_agent import cli as agent_cli
from coordinator import cli as coordinator_cli
from coordinator.app import Coordinator


def test_agent_command_line_sets_the_outage_budget() -> None:
    parser = agent_cli.build_parser()
    base = ["--redis", "redis://x", "--clients", "0"]
    given = agent_cli.settings_from_args(parser.parse_args([*base, "--redis-outage-s", "42"]),
                                         environ={})
    default = agent_cli.settings_from_args(parser.parse_args(base), environ={})
    assert given.redis_settings().outage_s == 42.0
    assert default.redis_settings().outage_s == DEFAULT_OUTAGE_S


def test_coordinator_passes_its_outage_budget_to_local_agents() -> None:
    args = coordinator_cli.build_parser().parse_args(["--redis-outage-s", "42", "--run-id", "o"])
    settings = coordinator_cli.settings_from_args(args)
    assert settings.redis_settings().outage_s == 42.0
    options = Coordinator(settings)._agent_access().redis_options
    assert options[options.index("--redis-outage-s") + 1] == "42"
