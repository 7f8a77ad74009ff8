"""An offline GaussDB(for MySQL) proxy API: rehearse a maintenance window without touching the cloud.

A separate program that speaks only HTTP (it never imports the engine, store or policy). See
``docs/simulator.md`` for the scenario format, the routes and the ``/_sim`` endpoints.
"""

from orchestrator.simulator.app import CallLog, SimulatorServer, run_simulator, serve
from orchestrator.simulator.fleet import Fleet
from orchestrator.simulator.scenario import (
    Scenario,
    ScenarioError,
    generate_scenario,
    load_bundled,
    scenario_to_inventory,
)

__all__ = [
    "CallLog",
    "Fleet",
    "Scenario",
    "ScenarioError",
    "SimulatorServer",
    "generate_scenario",
    "load_bundled",
    "run_simulator",
    "scenario_to_inventory",
    "serve",
]
