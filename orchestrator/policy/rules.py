"""Rules: what an outcome looks like (``Match``) and what to do about it (``Rule``), plus the defaults.

A rule matches a ``Subject``, the flattened view of one thing the cloud said: one REJECT item of an
upgrade answer, one HTTP error, one transport failure or one finished workflow. Keeping the subject flat
lets one AND-of-keys matcher serve every kind of outcome, and lets an operator override any default with
the same vocabulary the defaults are written in (docs/policy.md shows them as YAML).

The defaults implement the classification table of docs/policy.md: at the upgrade stage only an answer
that proves a refusal (a documented error code in a 4xx JSON error body, 401/403, 429 or APIGW.0308
throttling) may be resent without reconciling; everything else that may have reached the backend goes to
``reconcile``. Error codes and statuses come from the API contract (shared docs/api-contract.md, taken from
Huawei's GaussDB(for MySQL) v3 API reference and its Python SDK): the upgrade call's 400/404/409 codes,
``DBS.200543`` (a new job not yet queryable) and the gateway's ``APIGW.0308`` (throttled).

Hints name one next step; ``{run}`` (``RUN_PLACEHOLDER``) stands where the run id goes and the renderers
fill it (``decide.render_hint``).
"""

from __future__ import annotations

import enum
import fnmatch
import re
from dataclasses import dataclass, field

from orchestrator.outcomes import TransportKind
from orchestrator.policy.backoff import Backoff


class Action(enum.StrEnum):
    """What a job does next (docs/policy.md has the job status each one moves to)."""

    ACCEPTED = "accepted"  # ACCEPT items: the job moves to accepted (Decision.partial: flag after tracking)
    RETRY = "retry"  # transient: schedule again at now + delay (job -> retry_wait)
    FLAG = "flag"  # needs an operator (job -> flagged) with reason + hint
    FAIL = "fail"  # give up (job -> failed)
    SKIP = "skip"  # nothing to do (job -> skipped), e.g. 400 DBS.05000008 already latest
    RECONCILE = "reconcile"  # the call may have taken effect: check via reads before resending (-> unknown)
    STOP_RUN = "stop_run"  # e.g. 401: stop the whole run at once, leave this job resendable


# ACCEPTED is never chosen by a rule: it is what an answer with nothing but ACCEPT items means.
RULE_ACTIONS: tuple[Action, ...] = tuple(a for a in Action if a is not Action.ACCEPTED)


class Stage(enum.StrEnum):
    """Which call an outcome came from: only the upgrade POST can change the cloud."""

    UPGRADE = "upgrade"  # the upgrade POST: not idempotent, a lost answer must be reconciled
    PREFLIGHT = "preflight"  # proxy-version read before the upgrade: safe to repeat
    TRACK = "track"  # jobs?id= polls after ACCEPT: safe to repeat


WORKFLOW_STATUSES: tuple[str, ...] = ("Pending", "Running", "Completed", "Failed", "Canceled", "Unauthorized")


@dataclass(frozen=True, slots=True)
class Subject:
    """One thing to match. A key a subject does not have (None) never matches a rule that names it."""

    stage: Stage
    http_status: int | None = None  # HTTP errors only (not REJECT items, not transport failures)
    error_code: str | None = None
    message: str | None = None  # REJECT error_message, HTTP error_msg or workflow fail_reason
    transport: TransportKind | None = None
    sent: bool | None = None
    state: str | None = None  # "REJECT" for a REJECT item of an upgrade answer
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
        """Whether every key this match names matches ``s`` (a key the subject lacks never matches):
        statuses by pattern, error codes by case-sensitive glob, the message by case-insensitive regex
        search, workflow statuses case-insensitively, the rest by equality."""
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
    """One policy rule: the first whose ``match`` matches an outcome decides it with ``action``."""

    name: str
    match: Match
    action: Action
    hint: str | None = None
    backoff: Backoff | None = None  # per-rule override (already merged over the policy's backoff)
    throttle: bool = False  # the gateway is throttling: the run-wide limiter should slow down
    # the failure breaker counts a job this rule ends (YAML key ``counts``): a flag or fail, a retry given
    # up after max_attempts, or a reconcile whose resends ran out. True for a sign that the build or the
    # cloud is bad, False for a precondition of one proxy (docs/policy.md, "The failure breaker")
    counts_failure: bool = False


@dataclass(frozen=True, slots=True)
class Policy:
    """A run's rules in order (operator rules, then the defaults) and its default backoff."""

    rules: tuple[Rule, ...]
    backoff: Backoff = field(default_factory=Backoff)

    def rule_named(self, name: str) -> Rule | None:
        """The rule called ``name`` among this policy's rules, the guards and the catch-all; None if none."""
        for rule in (*self.rules, *GUARD_RULES, CATCH_ALL):
            if rule.name == name:
                return rule
        return None

    @classmethod
    def default(cls) -> Policy:
        """The built-in rules (``DEFAULT_RULES``: docs/policy.md's table) with the default backoff."""
        return cls(rules=DEFAULT_RULES, backoff=Backoff())

    def first_match(self, subject: Subject) -> Rule:
        """The first rule that matches; a policy without a catch-all falls back to the built-in one."""
        for rule in self.rules:
            if rule.match.matches(subject):
                return rule
        return CATCH_ALL


RUN_PLACEHOLDER = "{run}"  # hints write this where the run id goes; the renderers fill it in
_RETRY_FLAGGED = "then run: orchestrator retry {run} --flagged"
_RETRY_FAILED = "then run: orchestrator retry {run} --failed"
_RESUME = "then run: orchestrator resume {run}"
_TRANSPORTS = (TransportKind.CONNECT, TransportKind.TIMEOUT, TransportKind.RESET, TransportKind.MALFORMED)
_UPGRADE = (Stage.UPGRADE,)
_READS = (Stage.PREFLIGHT, Stage.TRACK)
_4XX = ("4xx",)
# 409 codes of the upgrade call: another operation is running on the instance (API contract, section 1).
BUSY_CODES = ("DBS.200019", "DBS.201014", "DBS.201015", "DBS.200047", "DBS.05000084", "DBS.212033")
ALREADY_LATEST_CODE = "DBS.05000008"  # 400: the proxy already runs the latest version (API contract)
SUBNET_IP_REGEX = r"insufficient.*subnet.*ip|subnet.*(ip|address).*(insufficient|not enough)"

CATCH_ALL = Rule(
    "default:catch-all",
    Match(),
    Action.FAIL,
    hint="No policy rule covers this answer: read the raw code and message; if it is transient or expected, "
    "add a rule for it (docs/policy.md), " + _RETRY_FAILED,
    counts_failure=True,
)

# Order matters: the first match wins. TLS first (a configuration error at any stage), then transport
# failures, so that no HTTP rule can ever turn a lost upgrade answer into a blind resend; read-only stages
# retry every transport failure (reads are safe to repeat). Then the answers that prove a refusal, then
# reads' server errors, REJECT items and workflows, and last everything else the upgrade call can meet:
# not a proven refusal, so reconcile.
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(
        "default:tls",
        Match(transport=(TransportKind.TLS,)),
        Action.STOP_RUN,
        hint="The endpoint's TLS certificate failed verification: a configuration error, not a transient "
        "one. Check the endpoint host (it must match the certificate) and, behind a TLS-inspecting proxy, "
        "pass its CA with --ca-bundle; " + _RESUME,
    ),
    Rule(
        "default:read-transport",
        Match(transport=_TRANSPORTS, stage=_READS),
        Action.RETRY,
        hint="Reads of the cloud kept failing: check the network and the cloud's health, " + _RETRY_FAILED,
        counts_failure=True,
    ),
    Rule(
        "default:transport-not-sent",
        Match(transport=_TRANSPORTS, sent=False),
        Action.RETRY,
        hint="The cloud could not be reached: check the endpoint, DNS, network and HTTP proxy settings, "
        + _RETRY_FAILED,
        counts_failure=True,
    ),
    Rule(
        "default:transport-answer-lost",
        Match(transport=_TRANSPORTS, sent=True, stage=_UPGRADE),
        Action.RECONCILE,
        counts_failure=True,
    ),
    Rule(
        "default:throttled",
        Match(http_status=("429",)),
        Action.RETRY,
        hint="The gateway kept throttling: lower --rate (another tool may share the account's limit), "
        + _RETRY_FAILED,
        throttle=True,
        counts_failure=True,
    ),
    Rule(
        "default:throttled-apigw",
        Match(http_status=_4XX, error_code=("APIGW.0308",)),
        Action.RETRY,
        hint="The gateway kept throttling: lower --rate (another tool may share the account's limit), "
        + _RETRY_FAILED,
        throttle=True,
        counts_failure=True,
    ),
    Rule(
        "default:unauthenticated",
        Match(http_status=("401",)),
        Action.STOP_RUN,
        hint="The cloud refused the credentials (token or AK/SK) and nothing more was sent: fix them, "
        + _RESUME,
    ),
    Rule(
        "default:forbidden",
        Match(http_status=("403",)),
        Action.STOP_RUN,
        hint="Grant the IAM permission gaussdbformysql:proxy:upgrade (and read access to GaussDB instances "
        "and jobs) to the user or agency; nothing more was sent; " + _RESUME,
    ),
    Rule(
        "default:job-not-visible",
        Match(http_status=_4XX, error_code=("DBS.200543",), stage=(Stage.TRACK,)),
        Action.RETRY,
        hint="The cloud never showed the accepted workflow: look for it in the console's task center, "
        + _RETRY_FAILED,
        counts_failure=True,
    ),
    Rule(
        "default:busy",
        Match(http_status=_4XX, error_code=BUSY_CODES),
        Action.RETRY,
        hint="The instance stayed busy with another operation (backup, scaling, another upgrade): wait "
        "until it ends in the console, " + _RETRY_FAILED,
    ),
    Rule("default:already-latest", Match(http_status=_4XX, error_code=(ALREADY_LATEST_CODE,)), Action.SKIP),
    Rule(
        "default:kernel-too-early",
        Match(http_status=_4XX, error_code=("DBS.05000001",)),
        Action.FLAG,
        hint="The instance's DB kernel is too old for this proxy version: upgrade the instance's kernel "
        "first, " + _RETRY_FLAGGED,
    ),
    Rule(
        "default:parameter-error",
        Match(http_status=_4XX, error_code=("DBS.200001",)),
        Action.FLAG,
        hint="The cloud refused the request's parameters: check the entry's source_version (the proxy's "
        "current version) and target_version (>= source) against proxy-version, fix the inventory, "
        + _RETRY_FLAGGED,
    ),
    Rule(
        "default:proxy-not-found",
        Match(http_status=_4XX, error_code=("DBS.270024",)),
        Action.FLAG,
        hint="The proxy does not exist (deleted, or a wrong proxy_id for this instance): fix or remove the "
        "inventory entry",
    ),
    Rule(
        "default:instance-not-found",
        Match(http_status=_4XX, error_code=("DBS.200002",)),
        Action.FLAG,
        hint="The instance does not exist (deleted, or a wrong instance_id, project or region): fix or "
        "remove the inventory entry",
    ),
    Rule(
        "default:server-error-unproven",
        Match(http_status=("5xx",), stage=_UPGRADE),
        Action.RECONCILE,
        counts_failure=True,
    ),
    Rule(
        "default:server-error",
        Match(http_status=("5xx",), stage=_READS),
        Action.RETRY,
        hint="The cloud kept answering server errors: check its health (status page, console), "
        + _RETRY_FAILED,
        counts_failure=True,
    ),
    Rule(
        "default:read-refused",
        Match(http_status=_4XX, stage=_READS),
        Action.FLAG,
        hint="The cloud refused a read with an error this policy does not know: read the code and message, "
        "fix the inventory entry or add a rule for it (docs/policy.md), " + _RETRY_FLAGGED,
    ),
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
        counts_failure=True,
    ),
    Rule(
        "default:workflow-failed",
        Match(workflow_status=("Failed", "Canceled")),
        Action.FLAG,
        hint="The cloud accepted the upgrade but its workflow did not complete: read fail_reason (and the "
        "task in the console's task center), fix the cause, " + _RETRY_FLAGGED,
        counts_failure=True,
    ),
    Rule(
        "default:workflow-unauthorized",
        Match(workflow_status=("Unauthorized",)),
        Action.FLAG,
        hint="The upgrade workflow was not authorised: check the IAM permissions of the user or agency "
        "(gaussdbformysql:proxy:upgrade), " + _RETRY_FLAGGED,
        counts_failure=True,
    ),
    Rule("default:unproven-answer", Match(stage=_UPGRADE), Action.RECONCILE, counts_failure=True),
    CATCH_ALL,
)

# Guards: applied by ``decide`` before the policy's rules, at the upgrade stage, when an earlier attempt of
# the same job may have reached the backend and is not settled (``earlier_attempt_unsettled``). Then
# "already at target", "another operation is in progress" or any other "nothing to do" may be our own
# earlier upgrade: reconcile (find and record that workflow) instead of skipping or resending. They are not
# part of a Policy and cannot be overridden: they keep the "never lost" promise whatever the rules say.
GUARD_ALREADY_LATEST = Rule(
    "default:resend-met-already-latest",
    Match(http_status=_4XX, error_code=(ALREADY_LATEST_CODE,), stage=_UPGRADE),
    Action.RECONCILE,
    counts_failure=True,
)
GUARD_BUSY = Rule(
    "default:resend-met-busy",
    Match(http_status=_4XX, error_code=BUSY_CODES, stage=_UPGRADE),
    Action.RECONCILE,
    counts_failure=True,
)
# Not matched on a Subject: it catches any other answer the policy would ``skip`` (an operator's rule, or
# REJECT items that all needed nothing).
GUARD_SKIP = Rule("default:resend-met-skip", Match(stage=_UPGRADE), Action.RECONCILE, counts_failure=True)
GUARD_RULES: tuple[Rule, ...] = (GUARD_ALREADY_LATEST, GUARD_BUSY, GUARD_SKIP)
