"""The outcome policy: what a job does next given what a cloud call came back with.

``decide``/``rules``/``backoff`` are pure and I/O-free (they import only ``orchestrator.outcomes``,
``orchestrator.states`` and pydantic), so the engine and tracker can call them anywhere and tests can run
them as a table. ``loader`` turns operator policies (a ``--policy`` file, an inventory's ``policy:``
block, a stored run's options) into a ``Policy`` and back. See docs/policy.md.
"""

from orchestrator.policy.backoff import Backoff, backoff_delay
from orchestrator.policy.decide import Decision, decide, decide_workflow
from orchestrator.policy.loader import (
    PolicyError,
    PolicyFileError,
    PolicyFileErrors,
    inventory_policy,
    load_policy_file,
    parse_policy,
    policy_to_dict,
)
from orchestrator.policy.rules import DEFAULT_RULES, Action, Match, Policy, Rule, Stage

__all__ = [
    "DEFAULT_RULES",
    "Action",
    "Backoff",
    "Decision",
    "Match",
    "Policy",
    "PolicyError",
    "PolicyFileError",
    "PolicyFileErrors",
    "Rule",
    "Stage",
    "backoff_delay",
    "decide",
    "decide_workflow",
    "inventory_policy",
    "load_policy_file",
    "parse_policy",
    "policy_to_dict",
]
