"""Each model-tier container and pod is given its cores (compose `cpus`, a Kubernetes CPU limit):
the cgroup quota its runtime threads default to (services/common/machine.py), so replicas packed
on one host do not oversubscribe it."""

from __future__ import annotations

import re
from pathlib import Path

from services.common.machine import usable_cores
from tests.test_deploy_manifests import MODEL_TIERS, by_kind, compose


def test_compose_gives_each_model_container_a_settable_cpu_quota(tmp_path: Path) -> None:
    services = compose()["services"]
    for tier in MODEL_TIERS:
        for name in (tier, f"{tier}-gpu"):
            cpus = services[name]["cpus"]
            match = re.fullmatch(rf"\$\{{{tier.upper()}_CPUS:-(\d+(?:\.\d+)?)\}}", str(cpus))
            assert match, f"{name}: cpus {cpus!r} is not ${{{tier.upper()}_CPUS:-N}}"
            # Docker turns cpus into a CFS quota of that many periods; the threads follow it.
            (tmp_path / "cpu.max").write_text(f"{int(float(match.group(1)) * 100000)} 100000\n")
            assert usable_cores(set(range(64)), tmp_path).count == int(float(match.group(1)))


def test_k8s_model_pods_have_a_cpu_limit_at_least_their_request() -> None:
    deployments = by_kind("Deployment")
    for tier in MODEL_TIERS:
        resources = deployments[tier]["spec"]["template"]["spec"]["containers"][0]["resources"]
        limit, request = float(resources["limits"]["cpu"]), float(resources["requests"]["cpu"])
        assert limit >= request >= 1, (tier, resources)
