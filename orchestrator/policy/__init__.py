"""The outcome policy: what a job does next given what a cloud call came back with.

Pure and I/O-free (imports only ``orchestrator.outcomes``, ``orchestrator.states`` and pydantic), so the
engine and tracker can call it anywhere and tests can run it as a table. See docs/policy.md.
"""

from orchestrator.policy.backoff import Backoff, backoff_delay
from orchestrator.policy.decide import Decision, decide, decide_workflow
from orchestrator.policy.loader import PolicyError, parse_policy, policy_to_dict
from orchestrator.policy.rules import DEFAULT_RULES, Action, Match, Policy, Rule, Stage

__all__ = [
    "DEFAULT_RULES",
    "Action",
    "Backoff",
    "Decision",
    "Match",
    "Policy",
    "PolicyError",
    "Rule",
    "Stage",
    "backoff_delay",
    "decide",
    "decide_workflow",
    "parse_policy",
    "policy_to_dict",
]
