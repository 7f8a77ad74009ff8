"""Rules: what an outcome looks like (``Match``) and what to do about it (``Rule``), plus the defaults.

A rule matches a ``Subject``, the flattened view of one thing the cloud said: one REJECT item of an
upgrade answer, one HTTP error, one transport failure or one finished workflow. Keeping the subject flat
lets one AND-of-keys matcher serve every kind of outcome, and lets an operator override any default with
the same vocabulary the defaults are written in (docs/policy.md shows them as YAML).
"""

from __future__ import annotations

import enum
import fnmatch
import re
from dataclasses import dataclass, field

from orchestrator.outcomes import TransportKind
from orchestrator.policy.backoff import Backoff


class Action(enum.StrEnum):
    ACCEPTED = "accepted"  # every item ACCEPT: the job moves to accepted
    RETRY = "retry"  # transient: schedule again at now + delay (job -> retry_wait)
    FLAG = "flag"  # needs an operator (job -> flagged) with reason + hint
    FAIL = "fail"  # give up (job -> failed)
    SKIP = "skip"  # nothing to do (job -> skipped), e.g. 400 DBS.05000008 already latest
    RECONCILE = "reconcile"  # the call may have taken effect: check via reads before resending (-> unknown)
    STOP_RUN = "stop_run"  # e.g. 401: stop the whole run at once, leave this job resendable


# ACCEPTED is never chosen by a rule: it is what an answer with nothing but ACCEPT items means.
RULE_ACTIONS: tuple[Action, ...] = tuple(a for a in Action if a is not Action.ACCEPTED)


class Stage(enum.StrEnum):
    UPGRADE = "upgrade"  # the upgrade POST: not idempotent, a lost answer must be reconciled
    PREFLIGHT = "preflight"  # proxy-version read before the upgrade: safe to repeat
    TRACK = "track"  # jobs?id= polls after ACCEPT: safe to repeat


WORKFLOW_STATUSES: tuple[str, ...] = ("Pending", "Running", "Completed", "Failed", "Canceled", "Unauthorized")


@dataclass(frozen=True, slots=True)
class Subject:
    """One thing to match. A key a subject does not have (None) never matches a rule that names it."""

    stage: Stage
    http_status: int | None = None  # HTTP errors and REJECT items (the answer's status), not transports
    error_code: str | None = None
    message: str | None = None  # REJECT error_message, HTTP error_msg or workflow fail_reason
    transport: TransportKind | None = None
    sent: bool | None = None
    state: str | None = None  # "REJECT" for every item that is not a clean ACCEPT
    workflow_status: str | None = None


def status_matches(pattern: str, status: int) -> bool:
    """``"5xx"``/``"40x"`` style patterns; a plain ``"409"`` is an exact code."""
    digits = f"{status:03d}"
    return len(digits) == len(pattern) and all(p in ("x", d) for p, d in zip(pattern, digits, strict=True))


@dataclass(frozen=True, slots=True)
class Match:
    """All keys given must match (AND); an empty Match matches everything."""

    http_status: tuple[str, ...] | None = None  # normalised patterns: "409", "5xx"
    error_code: tuple[str, ...] | None = None  # fnmatch globs, case-sensitive
    message: str | None = None  # regex, searched case-insensitively
    transport: tuple[TransportKind, ...] | None = None
    sent: bool | None = None
    state: str | None = None  # only "REJECT"
    workflow_status: tuple[str, ...] | None = None  # canonical spelling from WORKFLOW_STATUSES
    stage: tuple[Stage, ...] | None = None
    _regex: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Compiled once here; an invalid operator regex is caught by the loader, which compiles first.
        if self.message is not None:
            object.__setattr__(self, "_regex", re.compile(self.message, re.IGNORECASE))

    def matches(self, s: Subject) -> bool:
        return all(
            (
                self.stage is None or s.stage in self.stage,
                self.http_status is None
                or (
                    s.http_status is not None
                    and any(status_matches(p, s.http_status) for p in self.http_status)
                ),
                self.error_code is None
                or (
                    s.error_code is not None
                    and any(fnmatch.fnmatchcase(s.error_code, g) for g in self.error_code)
                ),
                self._regex is None or (s.message is not None and self._regex.search(s.message) is not None),
                self.transport is None or (s.transport is not None and s.transport in self.transport),
                self.sent is None or (s.sent is not None and s.sent == self.sent),
                self.state is None or s.state == self.state,
                self.workflow_status is None
                or (
                    s.workflow_status is not None
                    and s.workflow_status.lower() in {w.lower() for w in self.workflow_status}
                ),
            )
        )


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    match: Match
    action: Action
    hint: str | None = None
    backoff: Backoff | None = None  # per-rule override (already merged over the policy's backoff)
    throttle: bool = False  # the gateway is throttling: the run-wide limiter should slow down
    # the failure breaker counts a job this rule flags or fails (YAML key ``counts``): a sign the build
    # or the cloud is bad, not a precondition of one proxy (docs/policy.md)
    counts_failure: bool = False


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...]
    backoff: Backoff = field(default_factory=Backoff)

    @classmethod
    def default(cls) -> Policy:
        return cls(rules=DEFAULT_RULES, backoff=Backoff())

    def first_match(self, subject: Subject) -> Rule:
        """The first rule that matches; a policy without a catch-all falls back to the built-in one."""
        for rule in self.rules:
            if rule.match.matches(subject):
                return rule
        return CATCH_ALL


_RETRY_FLAGGED = "then run: orchestrator retry RUN --flagged"
_ALL_TRANSPORTS = tuple(TransportKind)
_READS = (Stage.PREFLIGHT, Stage.TRACK)
BUSY_CODES = ("DBS.200019", "DBS.201014", "DBS.201015", "DBS.200047", "DBS.05000084", "DBS.212033")
SUBNET_IP_REGEX = r"insufficient.*subnet.*ip|subnet.*(ip|address).*(insufficient|not enough)"

CATCH_ALL = Rule(
    "default:catch-all",
    Match(),
    Action.FAIL,
    hint="No policy rule covers this answer: read the raw code and message; if it is transient or expected, "
    "add a rule for it (docs/policy.md), then run: orchestrator retry RUN --failed",
)

# Order matters: the first match wins. Transport rules come first so that no HTTP rule can ever turn a lost
# upgrade answer into a blind resend; read-only stages retry every transport failure (reads are safe).
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("default:read-transport", Match(transport=_ALL_TRANSPORTS, stage=_READS), Action.RETRY),
    Rule("default:transport-not-sent", Match(transport=_ALL_TRANSPORTS, sent=False), Action.RETRY),
    Rule(
        "default:transport-answer-lost",
        Match(transport=_ALL_TRANSPORTS, sent=True, stage=(Stage.UPGRADE,)),
        Action.RECONCILE,
    ),
    Rule("default:throttled", Match(http_status=("429",)), Action.RETRY, throttle=True),
    Rule("default:throttled-apigw", Match(error_code=("APIGW.0308",)), Action.RETRY, throttle=True),
    Rule(
        "default:unauthenticated",
        Match(http_status=("401",)),
        Action.STOP_RUN,
        hint="check credentials: the token or AK/SK was refused; nothing more will be sent",
    ),
    Rule(
        "default:forbidden",
        Match(http_status=("403",)),
        Action.STOP_RUN,
        hint="grant the IAM permission gaussdbformysql:proxy:upgrade (and read access to GaussDB "
        "instances and jobs) to the user or agency; nothing more will be sent",
    ),
    Rule("default:job-not-visible", Match(error_code=("DBS.200543",), stage=(Stage.TRACK,)), Action.RETRY),
    Rule("default:busy", Match(error_code=BUSY_CODES), Action.RETRY),
    Rule("default:busy-409", Match(http_status=("409",)), Action.RETRY),
    Rule("default:already-latest", Match(http_status=("400",), error_code=("DBS.05000008",)), Action.SKIP),
    Rule(
        "default:kernel-too-early",
        Match(http_status=("400",), error_code=("DBS.05000001",)),
        Action.FLAG,
        hint="The instance's DB kernel is too old for this proxy version: upgrade the instance's kernel "
        "first, " + _RETRY_FLAGGED,
    ),
    Rule(
        "default:parameter-error",
        Match(http_status=("400",), error_code=("DBS.200001",)),
        Action.FLAG,
        hint="The cloud refused the request's parameters: check the entry's source_version (the proxy's "
        "current version) and target_version (>= source) against proxy-version, fix the inventory, "
        + _RETRY_FLAGGED,
    ),
    Rule(
        "default:proxy-not-found",
        Match(http_status=("400",), error_code=("DBS.270024",)),
        Action.FLAG,
        hint="The proxy does not exist (deleted, or a wrong proxy_id for this instance): fix or remove the "
        "inventory entry",
    ),
    Rule(
        "default:instance-not-found",
        Match(http_status=("404",), error_code=("DBS.200002",)),
        Action.FLAG,
        hint="The instance does not exist (deleted, or a wrong instance_id, project or region): fix or "
        "remove the inventory entry",
    ),
    Rule(
        "default:bad-request",
        Match(http_status=("400",)),
        Action.FLAG,
        hint="The cloud refused the request: read the error, fix the cause or the inventory entry, "
        + _RETRY_FLAGGED,
    ),
    Rule("default:gateway-timeout", Match(http_status=("504",), stage=(Stage.UPGRADE,)), Action.RECONCILE),
    Rule("default:server-error", Match(http_status=("5xx",)), Action.RETRY),
    Rule(
        "default:reject-subnet-ip",
        Match(state="REJECT", message=SUBNET_IP_REGEX),
        Action.FLAG,
        hint="Free or add IP addresses in the proxy's subnet (or move the proxy to a larger subnet), "
        + _RETRY_FLAGGED,
    ),
    Rule(
        "default:reject-quota",
        Match(state="REJECT", message="quota"),
        Action.FLAG,
        hint="A quota is exhausted: raise it (or free what counts against it) in the console, "
        + _RETRY_FLAGGED,
    ),
    Rule(
        "default:reject",
        Match(state="REJECT"),
        Action.FLAG,
        hint="Read the cloud's message, fix the cause in the console, " + _RETRY_FLAGGED,
    ),
    Rule(
        "default:workflow-failed",
        Match(workflow_status=("Failed", "Canceled")),
        Action.FLAG,
        hint="The cloud accepted the upgrade but its workflow did not complete: read fail_reason (and the "
        "task in the console's task center), fix the cause, " + _RETRY_FLAGGED,
    ),
    Rule(
        "default:workflow-unauthorized",
        Match(workflow_status=("Unauthorized",)),
        Action.FLAG,
        hint="The upgrade workflow was not authorised: check the IAM permissions of the user or agency "
        "(gaussdbformysql:proxy:upgrade), " + _RETRY_FLAGGED,
    ),
    CATCH_ALL,
)
