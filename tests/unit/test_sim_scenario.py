"""Scenario validation, seeded generation and the inventory written for a scenario."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import yaml

from orchestrator.simulator.scenario import (
    Scenario,
    ScenarioError,
    generate_scenario,
    load_bundled,
    scenario_to_inventory,
)

PROJECT = "054e292c9880d4992f02c0196d3ea468"


def _ids(scenario: Scenario) -> list[tuple[str, str]]:
    return [(i.id, p.id) for i in scenario.all_instances() for p in i.proxies]


def test_generation_is_reproducible_for_a_seed_and_differs_across_seeds() -> None:
    a = generate_scenario(50, seed=7, proxies_per_instance=3, reject_rate=0.2)
    b = generate_scenario(50, seed=7, proxies_per_instance=3, reject_rate=0.2)
    c = generate_scenario(50, seed=8, proxies_per_instance=3, reject_rate=0.2)
    assert _ids(a) == _ids(b)
    assert [p.reject for i in a.all_instances() for p in i.proxies] == [
        p.reject for i in b.all_instances() for p in i.proxies
    ]
    assert a.project_id == b.project_id != c.project_id
    assert set(_ids(a)).isdisjoint(_ids(c))


def test_generated_ids_have_the_documented_shapes_and_count() -> None:
    scenario = generate_scenario(10, seed=3, proxies_per_instance=4)
    assert re.fullmatch(r"[0-9a-f]{32}", scenario.project_id)
    instances = scenario.all_instances()
    assert [len(i.proxies) for i in instances] == [4, 4, 2]  # the last instance gets the remainder
    for inst_id, proxy_id in _ids(scenario):
        assert re.fullmatch(r"[0-9a-f]{32}in07", inst_id)
        assert re.fullmatch(r"[0-9a-f]{32}po01", proxy_id)


def test_changing_a_rate_does_not_reshuffle_ids() -> None:
    calm = generate_scenario(40, seed=11)
    rough = generate_scenario(40, seed=11, reject_rate=0.5, multi_node_rate=0.5, mixed_rate=1.0)
    assert _ids(calm) == _ids(rough)


def test_rates_shape_the_fleet() -> None:
    scenario = generate_scenario(
        2000, seed=5, reject_rate=0.1, multi_node_rate=0.3, mixed_rate=1.0, at_target_rate=0.05
    )
    proxies = [p for i in scenario.all_instances() for p in i.proxies]
    rejecting = [p for p in proxies if p.reject]
    assert 150 < len(rejecting) < 250
    assert all(p.reject == "Upgrade failed due to insufficient subnet ip" for p in rejecting)
    multi = [p for p in proxies if p.nodes > 1]
    assert 500 < len(multi) < 700
    mixed = [p for p in rejecting if p.nodes > 1]
    assert mixed and all(p.reject_nodes and len(p.reject_nodes) < p.nodes for p in mixed)
    at_target = [p for p in proxies if p.current_version == scenario.latest_version]
    assert 60 < len(at_target) < 140


def test_bundled_demo_is_about_300_proxies_with_some_rejections() -> None:
    demo = load_bundled()
    proxies = [p for i in demo.all_instances() for p in i.proxies]
    assert 280 <= len(proxies) <= 320
    rejecting = [p for p in proxies if p.reject or any(s.reject for s in p.script)]
    assert 0.03 <= len(rejecting) / len(proxies) <= 0.07
    assert sum(1 for p in proxies if p.reject_nodes) >= 2  # mixed multi-node answers
    assert len({p.id for p in proxies}) == len(proxies)


def test_load_explicit_scenario(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        f"""
seed: 4
speed: 20
project_id: "{PROJECT}"
fleet:
  instances:
    - id: inst1
      proxies:
        - id: p1
          nodes: 2
          reject: "no ip"
          reject_nodes: [1]
        - id: p2
          script:
            - reject: "Upgrade failed due to insufficient subnet ip"
            - http: 409
              error_code: DBS.200019
            - accept: true
faults:
  http_503: 0.1
  routes: [all]
auth:
  mode: token
  tokens: ["static-secret"]
""",
        encoding="utf-8",
    )
    scenario = Scenario.load(path)
    assert scenario.speed == 20
    p1, p2 = scenario.all_instances()[0].proxies
    assert (p1.nodes, p1.reject_nodes) == (2, [1])
    assert [s.http for s in p2.script] == [None, 409, None]
    assert scenario.faults.covers("job") and scenario.faults.http_503 == 0.1
    assert "static-secret" not in repr(scenario)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("current_version: 2.23\n", "current_version"),  # a YAML float, not a string
        ("speed: 0\n", "speed"),
        ("sped: 2\n", "sped"),  # unknown key
        ("seed: 1\nseed: 2\n", "duplicate key"),
        ("faults: {http_500: 0.6, http_503: 0.6}\n", "add up"),
        ("faults: {routes: [upgrades]}\n", "unknown fault routes"),
        ("fleet: {instances: [{id: i, proxies: [{id: p, nodes: 2, reject_nodes: [2]}]}]}\n", "out of range"),
        (
            "fleet: {instances: [{id: i, proxies: [{id: p, script: [{accept: true, reject: x}]}]}]}\n",
            "exactly one",
        ),
        ("fleet: {instances: [{id: 'a/b'}]}\n", "fleet.instances.0.id"),
        ("fleet: {generate: {instances: 2, proxies: 4}}\n", "exactly one"),
        ("project_id: short\n", "project_id"),
        ("- 1\n", "mapping"),
        ("latest_version: '1.0'\n", "older"),
    ],
)
def test_bad_scenarios_are_refused_with_the_field(text: str, fragment: str) -> None:
    with pytest.raises(ScenarioError, match=re.escape(fragment)):
        Scenario.from_yaml(text, source="bad.yaml")


def test_generate_scenario_rejects_unknown_knobs() -> None:
    with pytest.raises(TypeError, match="bogus"):
        generate_scenario(3, seed=1, bogus=1)


def test_generate_scenario_passes_scenario_knobs() -> None:
    scenario = generate_scenario(3, seed=1, speed=50, faults={"http_500": 0.5}, workflow={"pending_s": 1})
    assert scenario.speed == 50 and scenario.faults.http_500 == 0.5 and scenario.workflow.pending_s == 1


def test_inventory_yaml(tmp_path: Path) -> None:
    scenario = generate_scenario(7, seed=2, proxies_per_instance=2)
    path = tmp_path / "inv.yaml"
    assert scenario_to_inventory(scenario, path) == 7
    text = path.read_text(encoding="utf-8")
    assert 'source_version: "2.23.12.000"' in text  # quoted: YAML would read 2.23 as a float
    data = yaml.safe_load(text)
    assert data["defaults"] == {
        "project_id": scenario.project_id,
        "region": "cn-north-4",
        "source_version": "2.23.12.000",
        "target_version": "2.24.03.000",
    }
    assert [(p["instance_id"], p["proxy_id"]) for p in data["proxies"]] == _ids(scenario)


def test_inventory_csv_without_source_version(tmp_path: Path) -> None:
    scenario = generate_scenario(5, seed=2)
    path = tmp_path / "inv.csv"
    scenario_to_inventory(scenario, path, fmt="csv", region="ap-southeast-1", source_version=False)
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    assert list(rows[0]) == [
        "project_id",
        "instance_id",
        "proxy_id",
        "region",
        "source_version",
        "target_version",
    ]
    assert [(r["instance_id"], r["proxy_id"]) for r in rows] == _ids(scenario)
    assert {(r["region"], r["source_version"], r["target_version"]) for r in rows} == {
        ("ap-southeast-1", "", "2.24.03.000")
    }


@pytest.mark.parametrize("fmt", ["yaml", "csv"])
def test_inventory_loads_with_the_orchestrator_inventory_loader(tmp_path: Path, fmt: str) -> None:
    inventory = pytest.importorskip("orchestrator.inventory")
    scenario = generate_scenario(12, seed=9, proxies_per_instance=3)
    path = tmp_path / f"inv.{fmt}"
    scenario_to_inventory(scenario, path, fmt=fmt)  # type: ignore[arg-type]
    loaded = inventory.load_inventory(path)
    assert [(e.instance_id, e.proxy_id) for e in loaded.entries()] == _ids(scenario)


def test_the_reference_example_in_the_docs_is_a_valid_scenario() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "simulator.md"
    blocks = re.findall(r"```yaml\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "docs/simulator.md lost its scenario example"
    scenario = Scenario.from_yaml(blocks[0], source="docs/simulator.md")
    proxies = [p for i in scenario.all_instances() for p in i.proxies]
    assert len(proxies) == 201 and proxies[0].reject_nodes == [1] and len(proxies[0].script) == 4


def _traits(scenario: Scenario) -> list[tuple[object, ...]]:
    return [
        (p.id, p.nodes, p.reject, p.reject_nodes, p.current_version, p.omit_instance_id)
        for i in scenario.all_instances()
        for p in i.proxies
    ]


def test_not_active_and_no_upgrade_knobs_change_no_other_trait() -> None:
    knobs = {"reject_rate": 0.3, "multi_node_rate": 0.5, "mixed_rate": 1.0, "at_target_rate": 0.1}
    plain = generate_scenario(300, seed=9, **knobs)
    shaped = generate_scenario(300, seed=9, not_active_rate=0.2, no_upgrade_rate=0.1, **knobs)
    assert _traits(plain) == _traits(shaped)
    proxies = [p for i in shaped.all_instances() for p in i.proxies]
    assert {p.status for p in proxies} == {"ACTIVE", "ABNORMAL"}
    assert 30 < sum(p.status == "ABNORMAL" for p in proxies) < 90
    assert 10 < sum(p.can_upgrade is False for p in proxies) < 55
    assert all(p.can_upgrade is None for p in proxies if p.can_upgrade is not False)
    assert all(
        p.status == "ACTIVE" and p.can_upgrade is None for i in plain.all_instances() for p in i.proxies
    )
    frozen = generate_scenario(5, seed=9, not_active_rate=1.0, not_active_status="FAILED")
    assert {p.status for i in frozen.all_instances() for p in i.proxies} == {"FAILED"}


@pytest.mark.parametrize(("offset", "ok"), [(-180.0, True), (0.0, True), (864000.0, True), (864001.0, False)])
def test_clock_offset_is_a_bounded_scenario_field(offset: float, ok: bool) -> None:
    if ok:
        assert generate_scenario(1, seed=1, clock_offset_s=offset).clock_offset_s == offset
    else:
        with pytest.raises(ScenarioError, match="clock_offset_s"):
            Scenario.from_dict({"clock_offset_s": offset})
