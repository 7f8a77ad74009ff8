"""What a cloud call came back with, as plain values.

The cloud seam (``orchestrator.cloud``) turns every HTTP answer and every transport failure into one of
these; the pure policy (``orchestrator.policy``) decides on them. Neither side needs to know the other's
libraries, and the policy can be tested as a table with no network.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class TransportKind(enum.StrEnum):
    """How a call failed below HTTP. ``sent`` on the failure says whether the cloud may have acted."""

    CONNECT = "connect"  # refused, DNS, connect timeout, refused by may_send: the request never left
    TIMEOUT = "timeout"  # no (complete) answer within the request timeout after the request was sent
    RESET = "reset"  # the connection dropped after the request was sent
    MALFORMED = "malformed"  # an answer arrived but its body is not the documented shape
    TLS = "tls"  # the server's certificate failed verification: a configuration error, nothing was sent


@dataclass(frozen=True, slots=True)
class UpdateItem:
    """One element of ``update_result``: one node's (or instance's) verdict and its workflow."""

    workflow_id: str | None
    state: str  # exactly "ACCEPT" or "REJECT": cloud/answers.py refuses anything else as MALFORMED
    error_message: str | None = None
    instance_id: str | None = None

    @property
    def accepted(self) -> bool:
        """True when ``state`` is ACCEPT and ``error_message`` is empty.

        Huawei's Terraform provider treats anything else as failure (docs/api-contract.md, section 1)."""
        return self.state == "ACCEPT" and not self.error_message


@dataclass(frozen=True, slots=True)
class Answered:
    """A 2xx answer to the upgrade call with a well-formed ``update_result``."""

    http_status: int
    items: tuple[UpdateItem, ...]
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class HttpFailure:
    """A non-2xx answer; ``error_code``/``error_msg`` from the documented error body when present."""

    http_status: int
    error_code: str | None
    error_msg: str | None
    request_id: str | None = None
    retry_after: float | None = None  # seconds, already parsed from Retry-After (seconds or HTTP-date)


@dataclass(frozen=True, slots=True)
class TransportFailure:
    """A call that got no usable HTTP answer: refused or not sent, timed out, reset, TLS, or an answer
    whose body is not the documented shape (``MALFORMED``, with its ``http_status``)."""

    kind: TransportKind
    sent: bool  # True when the request may have reached the cloud (the outcome is then unknown)
    detail: str = ""
    http_status: int | None = None  # set for MALFORMED: the status of the unreadable answer
    request_id: str | None = None


Outcome = Answered | HttpFailure | TransportFailure


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """``proxy-version``: what the proxy runs and what it could run."""

    current_version: str
    latest_version: str | None
    can_upgrade: bool | None
    risk: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkflowInfo:
    """``GET /jobs?id=``: the state of one asynchronous workflow."""

    workflow_id: str
    status: str  # Pending, Running, Completed, Failed, Canceled, Unauthorized
    progress: str | None = None
    fail_reason: str | None = None
    created: str | None = None
    ended: str | None = None

    @property
    def ended_ok(self) -> bool:
        """True when the workflow's status is ``Completed``."""
        return self.status == "Completed"

    @property
    def is_final(self) -> bool:
        """True once the workflow has ended: Completed, Failed, Canceled or Unauthorized (the job statuses
        of docs/api-contract.md, section 5; Pending and Running are not final)."""
        return self.status in {"Completed", "Failed", "Canceled", "Unauthorized"}


@dataclass(frozen=True, slots=True)
class RecentJob:
    """One row of ``immediate-jobs``: used to find the workflow of an upgrade whose answer was lost."""

    job_id: str
    instance_id: str | None
    job_name: str | None
    status: str | None
    created_time: str | None
    extend_fields: str | None = None


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """One row of ``GET /instances``: what discovery needs of an instance."""

    instance_id: str
    name: str | None
    status: str | None  # e.g. ACTIVE, BACKING UP, ABNORMAL (not an exhaustive list in the contract)


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """One row of ``GET /instances/{id}/proxies``: ``proxy.pool_id`` is the proxy id."""

    proxy_id: str
    name: str | None
    status: str | None  # e.g. ACTIVE, ABNORMAL, FAILED, "ADDING PROXY NODE"
    node_num: int | None = None


def outcome_label(outcome: object) -> str:
    """A short, bounded label of a call's outcome for metrics and logs: ``accepted``, ``rejected`` or
    ``partial`` for an upgrade answer, ``http_<status>`` for an error answer, the transport kind, or ``ok``
    for any other documented 2xx answer."""
    if isinstance(outcome, Answered):
        states = {i.state for i in outcome.items}
        if states == {"ACCEPT"}:
            return "accepted"
        return "rejected" if "ACCEPT" not in states else "partial"
    if isinstance(outcome, HttpFailure):
        return f"http_{outcome.http_status}"
    if isinstance(outcome, TransportFailure):
        return outcome.kind.value
    return "ok"
