"""What the simulated cloud looks like: a validated scenario, its generated fleet, and an inventory for it.

A scenario is data, not code, so an operator can rehearse a maintenance window against a fleet shaped like
theirs (rejections, multi-node proxies, slow workflows, a storm of 503s) without touching the real cloud.
Everything random is drawn from RNGs seeded by ``seed`` so the same file gives the same fleet every time.
"""

from __future__ import annotations

import csv
import math
import random
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    model_validator,
)

VERSION_PATTERN = r"^\d+(\.\d+){1,4}$"
Version = Annotated[str, StringConstraints(strict=True, pattern=VERSION_PATTERN)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
# Path-safe: an id ends up inside URL paths, so nothing that could change a path.
SimId = Annotated[str, StringConstraints(strict=True, pattern=r"^[0-9A-Za-z_-]{1,64}$")]

WorkflowOutcome = Literal["complete", "fail", "hang", "no_version_change"]
FaultName = Literal[
    "http_500",
    "http_503",
    "http_429",
    "busy_409",
    "slow",
    "timeout",
    "timeout_after",
    "reset_before",
    "reset_after",
    "malformed_before",
    "malformed_after",
]
FAULT_NAMES: tuple[FaultName, ...] = (
    "http_500",
    "http_503",
    "http_429",
    "busy_409",
    "slow",
    "timeout",
    "timeout_after",
    "reset_before",
    "reset_after",
    "malformed_before",
    "malformed_after",
)
ROUTE_NAMES = ("upgrade", "proxy_version", "proxies", "instances", "job", "immediate_jobs", "token")
SUBNET_REJECT = "Upgrade failed due to insufficient subnet ip"
DEFAULT_CURRENT = "2.23.12.000"
DEFAULT_LATEST = "2.24.03.000"


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file and the offending field."""


def version_key(version: str) -> tuple[int, ...]:
    """``orchestrator.versions.version_key``: one notion of version order for the simulator and the
    orchestrator (``2.24 == 2.24.0``); raises ``ValueError`` for a string that is not a version."""
    from orchestrator.versions import version_key as key

    return key(version)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScriptStep(_Model):
    """One scripted answer to a proxy's next upgrade call; exactly one of accept/reject/http/fault."""

    accept: Literal[True] | None = None
    reject: str | None = None
    reject_nodes: list[int] | None = None  # with reject: only these node indexes reject
    http: int | None = Field(default=None, ge=400, le=599)
    error_code: str | None = None
    error_msg: str | None = None
    fault: FaultName | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> ScriptStep:
        kinds = [k for k in ("accept", "reject", "http", "fault") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a script step needs exactly one of accept, reject, http, fault (got {kinds})")
        if self.reject_nodes is not None and self.reject is None:
            raise ValueError("reject_nodes only goes with reject")
        if (self.error_code or self.error_msg) and self.http is None:
            raise ValueError("error_code/error_msg only go with http")
        return self


class ProxySpec(_Model):
    """One proxy of the scenario's fleet: versions (None: the scenario's), nodes (one workflow each), how
    its upgrade calls are answered (``reject`` on ``reject_nodes``, a fixed workflow outcome, a per-call
    ``script``), and what the read APIs show (``status``; ``omit_instance_id`` drops ``instance_id`` from
    its ``update_result`` items, as the contract allows)."""

    id: SimId
    name: str | None = None
    current_version: Version | None = None  # None: the scenario's current_version
    latest_version: Version | None = None  # None: the scenario's latest_version
    nodes: int = Field(default=1, ge=1, le=32)
    can_upgrade: bool | None = None  # None: current < latest; only changes what proxy-version reports
    reject: str | None = None  # every upgrade of this proxy is REJECTed with this message ...
    reject_nodes: list[int] | None = None  # ... on these node indexes only (None: all nodes)
    workflow: WorkflowOutcome | None = None  # None: drawn from the workflow rates
    fail_reason: str | None = None
    script: list[ScriptStep] = Field(default_factory=list)
    omit_instance_id: bool = False
    status: str = "ACTIVE"

    @model_validator(mode="after")
    def _nodes_in_range(self) -> ProxySpec:
        for step_nodes in [self.reject_nodes, *(s.reject_nodes for s in self.script)]:
            for index in step_nodes or ():
                if not 0 <= index < self.nodes:
                    raise ValueError(f"reject node index {index} out of range for {self.nodes} node(s)")
        return self


class InstanceSpec(_Model):
    """One instance: its id, name and status (as ``GET /instances`` shows them) and its proxies."""

    id: SimId
    name: str | None = None
    status: str = "ACTIVE"
    proxies: list[ProxySpec] = Field(default_factory=list)


class GenerateSpec(_Model):
    """A seeded fleet: give ``instances`` (x ``proxies_per_instance``) or a total of ``proxies``."""

    instances: int | None = Field(default=None, ge=0)
    proxies: int | None = Field(default=None, ge=0)
    proxies_per_instance: int = Field(default=1, ge=1, le=100)
    reject_rate: Probability = 0.0
    reject_message: str = SUBNET_REJECT
    multi_node_rate: Probability = 0.0
    multi_nodes: int = Field(default=2, ge=2, le=32)
    mixed_rate: Probability = 0.0  # of rejecting multi-node proxies: only some nodes reject
    at_target_rate: Probability = 0.0  # already running latest_version
    old_version_rate: Probability = 0.0  # running old_version instead of current_version
    old_version: Version = "2.23.06.000"
    omit_instance_id_rate: Probability = 0.0
    not_active_rate: Probability = 0.0  # proxies whose status is not_active_status (discovery skips them)
    not_active_status: str = "ABNORMAL"
    no_upgrade_rate: Probability = 0.0  # proxies whose proxy-version says can_upgrade: false
    name_prefix: str = "taurus"

    @model_validator(mode="after")
    def _one_size(self) -> GenerateSpec:
        if (self.instances is None) == (self.proxies is None):
            raise ValueError("give exactly one of generate.instances or generate.proxies")
        return self


class FleetSpec(_Model):
    """The fleet: explicit ``instances`` and/or a seeded ``generate`` block (generated ones come after)."""

    instances: list[InstanceSpec] = Field(default_factory=list)
    generate: GenerateSpec | None = None


class WorkflowSpec(_Model):
    """Workflow timings are in scenario seconds: divided by ``speed`` to get real seconds."""

    pending_s: float = Field(default=5.0, ge=0)
    running_s: float = Field(default=60.0, ge=0)
    job_visible_after_s: float = Field(default=3.0, ge=0)
    fail_rate: Probability = 0.0
    hang_rate: Probability = 0.0
    no_version_change_rate: Probability = 0.0
    fail_reason: str = "Proxy kernel upgrade failed: the proxy node did not come back after restart."

    @model_validator(mode="after")
    def _rates(self) -> WorkflowSpec:
        if self.fail_rate + self.hang_rate + self.no_version_change_rate > 1.0 + 1e-9:
            raise ValueError("workflow fail_rate + hang_rate + no_version_change_rate must be <= 1")
        return self


class FaultSpec(_Model):
    """Per-call probabilities (one seeded draw per call in scope picks at most one fault)."""

    http_500: Probability = 0.0
    http_503: Probability = 0.0
    http_429: Probability = 0.0
    busy_409: Probability = 0.0
    slow: Probability = 0.0
    timeout: Probability = 0.0  # hang without applying anything
    timeout_after: Probability = 0.0  # apply the upgrade, then hang
    reset_before: Probability = 0.0
    reset_after: Probability = 0.0
    malformed_before: Probability = 0.0
    malformed_after: Probability = 0.0
    routes: list[str] = Field(default_factory=lambda: ["upgrade"])
    slow_s: float = Field(default=2.0, ge=0)  # real seconds
    hang_s: float = Field(default=120.0, ge=0)  # real seconds; the handler is cancelled on disconnect
    retry_after_s: int | None = Field(default=2, ge=0)  # Retry-After on 429 (None: no header)
    rate_limit: int = Field(default=50, ge=1)  # the N in the 429 message
    busy_codes: list[str] = Field(default_factory=lambda: ["DBS.200019"], min_length=1)
    gateway_rate_limit: int | None = Field(default=None, ge=1)  # real throttle: calls per second, all routes

    @model_validator(mode="after")
    def _check(self) -> FaultSpec:
        total = sum(getattr(self, name) for name in FAULT_NAMES)
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault probabilities add up to {total:.3f} > 1")
        unknown = [r for r in self.routes if r != "all" and r not in ROUTE_NAMES]
        if unknown:
            raise ValueError(f"unknown fault routes {unknown}; use 'all' or some of {list(ROUTE_NAMES)}")
        return self

    def covers(self, route: str) -> bool:
        """Whether calls of ``route`` draw faults (``routes`` names it, or ``all``)."""
        return "all" in self.routes or route in self.routes


class UserSpec(_Model):
    """An IAM user the simulated ``POST /v3/auth/tokens`` accepts: name, domain, password."""

    name: str
    domain: str
    password: SecretStr


class KeySpec(_Model):
    """An AK/SK pair the simulated gateway accepts (with the STS token it expects, for temporary keys)."""

    ak: str = Field(min_length=1)
    sk: SecretStr
    # Temporary (STS) keys: the gateway also wants this X-Security-Token, signed with the request.
    security_token: SecretStr | None = None


class AuthSpec(_Model):
    """Gateway behaviour. Token lifetime, clock skew and key lock are REAL seconds (not scaled)."""

    mode: Literal["none", "token", "aksk", "any"] = "none"
    tokens: list[SecretStr] = Field(default_factory=list)  # static tokens always accepted
    users: list[UserSpec] = Field(default_factory=list)  # for POST /v3/auth/tokens
    token_lifetime_s: float = Field(default=86400.0, gt=0)
    keys: list[KeySpec] = Field(default_factory=list)
    max_skew_s: float = Field(default=900.0, ge=0)
    lock_after: int = Field(default=5, ge=1)
    lock_s: float = Field(default=300.0, ge=0)


class Scenario(_Model):
    """Everything the simulated cloud does: ``seed`` (ids, outcomes and faults are reproducible),
    ``speed`` (scenario seconds per real second), project id, versions, added latency, the cloud's clock
    offset, workflow timings, the fleet, faults and the gateway's auth. docs/simulator.md describes the
    keys; loading errors are ``ScenarioError``."""

    seed: int = 0
    speed: float = Field(default=1.0, gt=0)
    project_id: str = ""  # empty: derived from seed
    current_version: Version = DEFAULT_CURRENT
    latest_version: Version = DEFAULT_LATEST
    latency_s: float = Field(default=0.0, ge=0)  # real seconds added to every API call
    # The simulated cloud's clock minus the host's, in seconds: Date headers, job times, token expiry
    # and the X-Sdk-Date check all read it (a client must measure it, not assume it is small).
    clock_offset_s: float = Field(default=0.0, ge=-864000.0, le=864000.0)
    workflow: WorkflowSpec = Field(default_factory=WorkflowSpec)
    fleet: FleetSpec = Field(default_factory=FleetSpec)
    faults: FaultSpec = Field(default_factory=FaultSpec)
    auth: AuthSpec = Field(default_factory=AuthSpec)

    @model_validator(mode="after")
    def _finish(self) -> Scenario:
        if not self.project_id:
            self.project_id = _hex32(random.Random(f"{self.seed}:project"))
        if not re.fullmatch(r"[0-9A-Za-z]{32}", self.project_id):
            raise ValueError("project_id must be 32 letters/digits")
        if version_key(self.latest_version) < version_key(self.current_version):
            raise ValueError("latest_version is older than current_version")
        seen: set[str] = set()
        for inst in self.fleet.instances:
            for proxy in inst.proxies:
                if proxy.id in seen:
                    raise ValueError(f"proxy id {proxy.id} appears twice")
                seen.add(proxy.id)
        return self

    @classmethod
    def load(cls, path: str | Path) -> Scenario:
        """The scenario in the YAML file at ``path``. Raises ``OSError`` when it cannot be read and
        ``ScenarioError`` when it is not a valid scenario."""
        text = Path(path).read_text(encoding="utf-8")
        return cls.from_yaml(text, source=str(path))

    @classmethod
    def from_yaml(cls, text: str, source: str = "<scenario>") -> Scenario:
        """Parse scenario YAML (duplicate keys refused; empty text is the default scenario). Raises
        ``ScenarioError`` naming ``source``."""
        try:
            data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise ScenarioError(f"{source}: not valid YAML: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ScenarioError(f"{source}: a scenario is a mapping at the top level")
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<scenario>") -> Scenario:
        """Validate a scenario mapping. Raises ``ScenarioError``: ``source``, the first problem's key path
        and message, and how many more there are."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top)"
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            raise ScenarioError(f"{source}: {where}: {first['msg']}{more}") from None

    def all_instances(self) -> list[InstanceSpec]:
        """The explicit instances followed by the generated ones (reproducible for the seed)."""
        generated = generate_instances(self) if self.fleet.generate else []
        return [*self.fleet.instances, *generated]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        result[key] = loader.construct_object(value_node, deep=True)
    return result


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _hex32(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


def generate_instances(scenario: Scenario) -> list[InstanceSpec]:
    """The seeded part of the fleet: same seed and knobs, same IDs and the same special proxies.

    IDs come from one RNG stream and each proxy's traits from its own RNG (seeded by its id), so changing
    a rate changes which proxies are special but never the IDs.
    """
    gen = scenario.fleet.generate
    if gen is None:
        return []
    ids = random.Random(f"{scenario.seed}:fleet")
    per = gen.proxies_per_instance
    total = gen.proxies if gen.proxies is not None else (gen.instances or 0) * per
    n_instances = gen.instances if gen.instances is not None else math.ceil(total / per)
    instances: list[InstanceSpec] = []
    made = 0
    for i in range(n_instances):
        inst_id = _hex32(ids) + "in07"
        proxies: list[ProxySpec] = []
        for j in range(min(per, total - made)):
            proxy_id = _hex32(ids) + "po01"
            traits = random.Random(f"{scenario.seed}:proxy:{proxy_id}")
            proxies.append(_generate_proxy(traits, gen, scenario, proxy_id, f"{gen.name_prefix}-{i:04d}-{j}"))
        made += len(proxies)
        instances.append(InstanceSpec(id=inst_id, name=f"{gen.name_prefix}-{i:04d}", proxies=proxies))
    return instances


def _generate_proxy(
    rng: random.Random, gen: GenerateSpec, scenario: Scenario, proxy_id: str, name: str
) -> ProxySpec:
    draws = [rng.random() for _ in range(7)]  # a fixed number of draws per proxy, whatever the rates
    multi, rejects = draws[0] < gen.multi_node_rate, draws[1] < gen.reject_rate
    mixed, at_target = draws[2] < gen.mixed_rate, draws[3] < gen.at_target_rate
    old, omit = draws[4] < gen.old_version_rate, draws[5] < gen.omit_instance_id_rate
    nodes = gen.multi_nodes if multi else 1
    reject_nodes: list[int] | None = None
    if rejects and multi and mixed:
        count = 1 + int(draws[6] * (nodes - 1))  # 1 .. nodes-1 nodes reject
        reject_nodes = sorted(rng.sample(range(nodes), count))
    # Drawn after every older draw, so that adding these knobs changed no existing fleet.
    not_active, no_upgrade = rng.random() < gen.not_active_rate, rng.random() < gen.no_upgrade_rate
    current = scenario.latest_version if at_target else (gen.old_version if old else None)
    return ProxySpec(
        id=proxy_id,
        name=name,
        nodes=nodes,
        current_version=current,
        reject=gen.reject_message if rejects else None,
        reject_nodes=reject_nodes,
        omit_instance_id=omit,
        status=gen.not_active_status if not_active else "ACTIVE",
        can_upgrade=False if no_upgrade else None,
    )


_SCENARIO_FIELDS = {"speed", "project_id", "current_version", "latest_version", "latency_s", "clock_offset_s"}


def generate_scenario(n_proxies: int, seed: int, **knobs: Any) -> Scenario:
    """A generated fleet of ``n_proxies``; knobs are GenerateSpec fields, scenario fields, or
    ``workflow``/``faults``/``auth`` mappings (e.g. ``reject_rate=0.05, speed=100, faults={...}``)."""
    generate: dict[str, Any] = {"proxies": n_proxies}
    data: dict[str, Any] = {"seed": seed}
    for key, value in knobs.items():
        if key in GenerateSpec.model_fields and key not in {"proxies", "instances"}:
            generate[key] = value
        elif key in _SCENARIO_FIELDS or key in {"workflow", "faults", "auth"}:
            data[key] = value
        elif key == "instances":
            data.setdefault("fleet", {})["instances"] = value
        else:
            raise TypeError(f"generate_scenario() got an unknown knob {key!r}")
    data.setdefault("fleet", {})["generate"] = generate
    return Scenario.from_dict(data, source="generate_scenario()")


def bundled_scenario_text(name: str = "demo.yaml") -> str:
    """The text of a scenario shipped in ``orchestrator/simulator/scenarios``. Raises
    ``FileNotFoundError`` for an unknown ``name``."""
    return resources.files("orchestrator.simulator").joinpath("scenarios", name).read_text("utf-8")


def load_bundled(name: str = "demo.yaml") -> Scenario:
    """A bundled scenario, parsed (see ``bundled_scenario_text``)."""
    return Scenario.from_yaml(bundled_scenario_text(name), source=f"<bundled {name}>")


def scenario_to_inventory(
    scenario: Scenario,
    path: str | Path,
    fmt: Literal["yaml", "csv"] = "yaml",
    region: str = "cn-north-4",
    source_version: bool = True,
) -> int:
    """Write the orchestrator inventory an operator would write for this fleet; returns the proxy count.

    The inventory carries the fleet-wide source version (not each proxy's real one), so proxies that the
    scenario puts on another version show up as mismatches at preflight, as they would for real.
    """
    pairs = [(inst.id, proxy.id) for inst in scenario.all_instances() for proxy in inst.proxies]
    source = scenario.current_version if source_version else None
    target = scenario.latest_version
    out = Path(path)
    if fmt == "yaml":
        defaults: dict[str, str] = {"project_id": scenario.project_id, "region": region}
        if source is not None:
            defaults["source_version"] = source
        defaults["target_version"] = target
        lines = ["defaults:"]
        lines += [f"  {key}: {_quoted(value)}" for key, value in defaults.items()]
        lines.append("proxies:")
        lines += [f"  - {{instance_id: {_quoted(i)}, proxy_id: {_quoted(p)}}}" for i, p in pairs]
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif fmt == "csv":
        with out.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(
                ["project_id", "instance_id", "proxy_id", "region", "source_version", "target_version"]
            )
            for inst_id, proxy_id in pairs:
                writer.writerow([scenario.project_id, inst_id, proxy_id, region, source or "", target])
    else:
        raise ValueError(f"unknown inventory format {fmt!r} (yaml or csv)")
    return len(pairs)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
