"""docker-compose.yml, the Dockerfile, deploy/k8s, deploy/prometheus.yml and the Grafana dashboard:
each is checked by the tool that consumes it (or its schema, offline), and every command, flag,
environment variable, port and metric it names is checked against the code."""

from __future__ import annotations

import ast
import copy
import functools
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.stack import free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "inference-stack.json"
K8S_VERSION = "1.37.0"
MODEL_TIERS = ("generator", "embedder")
# Variables a container may set that are not a service's flags.
GENERIC_ENV = {"HF_HUB_OFFLINE", "PYTHONUNBUFFERED"}


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found, f"{name} is missing: `make install` installs it"
    return found


@functools.cache
def service_help(module: str) -> str:
    """`python -m services.X --help`, with the service's own variables cleared so that the
    defaults shown are the code's."""
    prefix = module.rsplit(".", 1)[-1].upper() + "_"
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"python -m {module} --help failed:\n{result.stderr[-3000:]}"
    return result.stdout


def flag_default(help_text: str, flag: str) -> str | None:
    """The default argparse prints for `flag` (ArgumentDefaultsHelpFormatter)."""
    # From the option's own entry, not from the usage line above the list.
    match = re.search(rf"^\s+--{re.escape(flag)}\b.*?\(default: ([^)]*)\)", help_text, re.S | re.M)
    return match.group(1) if match else None


def check_service_env(module: str, env: dict[str, str]) -> None:
    """Every variable is `<PREFIX>_<FLAG>` for a flag the service has; ports are its defaults."""
    assert module.startswith("services."), module
    prefix = module.rsplit(".", 1)[-1].upper()
    help_text = service_help(module)
    for name, value in env.items():
        if name in GENERIC_ENV:
            continue
        assert name.startswith(prefix + "_"), f"{module}: {name} is not a {prefix}_* variable"
        flag = name[len(prefix) + 1 :].lower().replace("_", "-")
        assert re.search(rf"--{re.escape(flag)}\b", help_text), f"{module} has no --{flag} (for {name})"
        if flag in ("port", "metrics-port"):
            assert flag_default(help_text, flag) == str(value), (
                f"{name}={value} differs from the code's default"
            )


def python_module(command: list[str]) -> str | None:
    if len(command) >= 3 and command[0] == "python" and command[1] == "-m":
        return command[2]
    return None


def check_module_runs(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"python -m {module} --help failed:\n{result.stderr[-2000:]}"


# -- docker-compose ---------------------------------------------------------------------------------


def test_compose_file_passes_the_compose_spec_schema() -> None:
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Interpolations compose accepts: $$ (a literal $), $NAME, ${NAME} and ${NAME:-default} forms.
INTERPOLATION = re.compile(r"\$(\$|[A-Za-z_][A-Za-z0-9_]*|\{[A-Za-z_][A-Za-z0-9_]*((:?[-?+])[^}]*)?\})")


def test_compose_merges_give_only_the_gpu_services_a_profile_and_every_path_exists() -> None:
    """What `docker compose config` adds to the schema for this file: the YAML merges resolve
    as intended, interpolations are well formed, and every file the services name exists."""
    text = COMPOSE.read_text()
    assert text.count("$") == sum(
        len(m.group(0)) - len(m.group(0).lstrip("$")) for m in INTERPOLATION.finditer(text)
    )
    services = compose()["services"]
    tiers = {"envoy", "gateway", "generator", "embedder", "predictions", "playground"}
    assert tiers | {"postgres", "prometheus", "grafana"} <= set(services)
    profiles = {
        name: service.get("profiles") for name, service in services.items() if service.get("profiles")
    }
    assert profiles == {"generator-gpu": ["gpu"], "embedder-gpu": ["gpu"]}
    # In a merge the first mapping wins: the GPU services take the GPU image, the tier's command.
    assert services["generator-gpu"]["image"] == "inference-stack:gpu"
    assert services["generator-gpu"]["command"] == services["generator"]["command"]
    assert services["embedder-gpu"]["command"] == services["embedder"]["command"]
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = ROOT / build["context"]
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
        assert set(service.get("depends_on", [])) <= set(services), name


def test_compose_commands_flags_and_ports_exist_in_the_code() -> None:
    services = compose()["services"]
    for name, service in services.items():
        command = service.get("command")
        module = python_module(command) if isinstance(command, list) else None
        if module is None:
            continue
        env = service.get("environment", {})
        check_service_env(module, env)
        prefix = module.rsplit(".", 1)[-1].upper()
        port, metrics_port = env[f"{prefix}_PORT"], env[f"{prefix}_METRICS_PORT"]
        health = service["healthcheck"]["test"]
        assert health[1:4] == ["python", "-m", "tools.healthcheck"], name
        check_module_runs("tools.healthcheck")
        assert health[health.index("--port") + 1] == port, f"{name}: health check probes another port"
        exposed = {str(p) for p in service.get("expose", [])} | {
            str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])
        }
        assert {port, metrics_port} <= exposed, f"{name} does not expose {port} and {metrics_port}"


def test_compose_wires_tiers_to_each_other_on_their_ports() -> None:
    services = compose()["services"]
    gateway_env = services["gateway"]["environment"]
    for tier in MODEL_TIERS:
        port = services[tier]["environment"][f"{tier.upper()}_PORT"]
        assert gateway_env[f"GATEWAY_{tier.upper()}_ADDRESSES"] == f"dns:///{tier}:{port}"
        gpu = services[f"{tier}-gpu"]
        # The GPU replicas answer to the same name, so the gateway balances over them too.
        assert gpu["networks"]["internal"]["aliases"] == [tier]
        assert gpu["command"] == services[tier]["command"]
        assert gpu["environment"] == services[tier]["environment"]
        assert gpu["profiles"] == ["gpu"]
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert services["gateway"]["depends_on"][tier]["condition"] == "service_healthy"
    assert services["envoy"]["depends_on"]["gateway"]["condition"] == "service_healthy"
    envoy_command = " ".join(services["envoy"]["command"])
    assert f"--gateway gateway:{gateway_env['GATEWAY_PORT']}" in envoy_command
    assert "8080:8080" in services["envoy"]["ports"]
    health = services["envoy"]["healthcheck"]["test"]
    assert health[health.index("--port") + 1] == "8080"


# What may publish a port on the host: the one public door (Envoy), the playground, and the
# monitoring UIs. Everything else is reached only through Envoy, on the internal network.
PUBLISHED = {"envoy", "playground", "prometheus", "grafana"}
BEHIND_ENVOY = {"gateway", *MODEL_TIERS, "generator-gpu", "embedder-gpu", "predictions", "postgres", "redis"}


def service_networks(service: dict[str, Any]) -> set[str]:
    networks = service.get("networks", ["default"])
    return set(networks if isinstance(networks, list) else networks.keys())


def test_compose_publishes_only_envoy_and_keeps_the_tiers_on_an_internal_network() -> None:
    data = compose()
    services, networks = data["services"], data["networks"]
    internal = {name for name, network in networks.items() if (network or {}).get("internal") is True}
    assert internal == {"internal"}
    assert set(services) == BEHIND_ENVOY | PUBLISHED
    for name in BEHIND_ENVOY:
        service = services[name]
        assert "ports" not in service, f"{name} publishes {service['ports']}"
        assert "internal" in service_networks(service), name
        # Nothing but the internal network, except the predictions service's way out for webhooks.
        assert service_networks(service) - {"internal"} <= ({"egress"} if name == "predictions" else set())
    assert not any("egress" in service_networks(services[name]) for name in set(services) - {"predictions"})
    for name in ("envoy", "playground"):
        assert service_networks(services[name]) == {"default", "internal"}, name
        assert services[name]["ports"], name
    # Prometheus scrapes the tiers (so joins them); Grafana only reads Prometheus.
    assert "internal" in service_networks(services["prometheus"])
    assert service_networks(services["grafana"]) == {"default"}
    # Health checks speak the tier's own TLS when it has <TIER>_TLS_* files.
    for name in ("gateway", *MODEL_TIERS, "predictions"):
        health = services[name]["healthcheck"]["test"]
        assert health[health.index("--tls-env") + 1] == name.upper(), name


def test_compose_runs_predictions_on_the_postgres_service() -> None:
    data = compose()
    services = data["services"]
    postgres, predictions = services["postgres"], services["predictions"]
    env = predictions["environment"]
    url = env["PREDICTIONS_DATABASE_URL"]
    pg = postgres["environment"]
    password = pg["POSTGRES_PASSWORD"]
    assert password.startswith("${POSTGRES_PASSWORD:-")
    assert url == f"postgresql+psycopg://{pg['POSTGRES_USER']}:{password}@postgres:5432/{pg['POSTGRES_DB']}"
    assert "5432" in postgres["expose"]
    assert postgres["image"].startswith("postgres:")
    health = postgres["healthcheck"]["test"]
    assert health[:2] == ["CMD", "pg_isready"] and pg["POSTGRES_USER"] in health
    # The data outlives the container: a named volume the file declares.
    (volume,) = postgres["volumes"]
    name, _, target = volume.partition(":")
    assert name in data["volumes"] and target == "/var/lib/postgresql/data"
    assert predictions["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "gateway": {"condition": "service_healthy"},
    }
    gateway_port = services["gateway"]["environment"]["GATEWAY_PORT"]
    assert env["PREDICTIONS_GATEWAY_ADDRESS"] == f"gateway:{gateway_port}"
    assert env["PREDICTIONS_PUBLIC_URL"].endswith("http://localhost:8080}")
    # Replicas must not clash on the host: nothing published, Envoy finds each by DNS.
    assert "ports" not in predictions
    envoy_command = " ".join(services["envoy"]["command"])
    assert f"--predictions predictions:{env['PREDICTIONS_PORT']}" in envoy_command
    assert services["playground"]["environment"]["PLAYGROUND_PREDICTIONS_ADDRESS"] == (
        f"predictions:{env['PREDICTIONS_PORT']}"
    )


def test_compose_envoy_command_renders_a_configuration_envoy_accepts(tmp_path: Path) -> None:
    command = compose()["services"]["envoy"]["command"][2]
    render, _, _ = command.partition("&&")
    args = shlex.split(render)
    assert args[:3] == ["python", "-m", "tools.envoy_config"]
    # Here the descriptor is the one the build made, not the image's path.
    args[args.index("--descriptor") + 1] = str(ROOT / "build" / "inference.pb")
    args[args.index("--output") + 1] = str(tmp_path / "envoy.yaml")
    result = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    validate = subprocess.run(
        [tool("envoy"), "--mode", "validate", "-c", str(tmp_path / "envoy.yaml"), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert validate.returncode == 0, validate.stdout[-3000:] + validate.stderr[-3000:]
    assert 'address: "predictions", port_value: 50054' in (tmp_path / "envoy.yaml").read_text()


def test_dockerfile_pins_the_same_versions_as_the_project() -> None:
    text = DOCKERFILE.read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins: dict[str, str] = {}
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        if "==" in requirement:
            name, version = requirement.split("==")
            pins[name.strip().lower()] = version.strip()
    makefile = (ROOT / "Makefile").read_text()
    for match in re.finditer(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"'\\]*)", makefile):
        pins.setdefault(match.group(1).lower(), match.group(2))
    named = re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"'\\]*)", text)
    assert named, "the Dockerfile pins nothing"
    for name, version in named:
        assert pins.get(name.lower()) == version, (
            f"Dockerfile pins {name}=={version}, the project {pins.get(name)}"
        )
    # From the build context only: `COPY --from=stage` copies out of another stage.
    for source in re.findall(r"^COPY\s+(?!--from=)(.+)\s+\S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"the Dockerfile copies {path}, which does not exist"


# -- Kubernetes -------------------------------------------------------------------------------------


def k8s_resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, "kustomization.yaml must list every manifest"
    return [doc for name in listed for doc in load_yaml_documents(K8S / name)]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in k8s_resources() if doc["kind"] == kind}


def test_k8s_manifests_pass_the_kubernetes_schemas() -> None:
    resources = k8s_resources()
    assert {doc["kind"] for doc in resources} >= {"Deployment", "Service", "HorizontalPodAutoscaler"}
    for doc in resources:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_schema_check_rejects_a_misspelled_field() -> None:
    deployment = copy.deepcopy(by_kind("Deployment")["generator"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_k8s_deployments_run_the_services_with_grpc_probes() -> None:
    deployments, services = by_kind("Deployment"), by_kind("Service")
    assert set(deployments) == {
        "envoy",
        "gateway",
        "generator",
        "embedder",
        "predictions",
        "playground",
        "redis",
    }
    for name in ("gateway", *MODEL_TIERS):
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        module = python_module(container["command"])
        assert module == f"services.{name}"
        env = {item["name"]: item.get("value", "") for item in container["env"]}
        check_service_env(module, env)
        port = int(env[f"{name.upper()}_PORT"])
        assert container["readinessProbe"]["grpc"]["port"] == port
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": port, "metrics": int(env[f"{name.upper()}_METRICS_PORT"])}
        annotations = deployments[name]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(ports["metrics"])
        service_ports = {p["name"]: p["port"] for p in services[name]["spec"]["ports"]}
        assert service_ports["grpc"] == port
        # Headless: the client (gateway, Envoy) resolves every replica and balances per request.
        assert services[name]["spec"]["clusterIP"] == "None"
    gateway = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]
    gateway_env = {item["name"]: item.get("value", "") for item in gateway["env"]}
    for tier in MODEL_TIERS:
        deployment = deployments[tier]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["livenessProbe"]["grpc"]["port"] == container["startupProbe"]["grpc"]["port"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "cpu" in container["resources"]["requests"]
        assert deployment["spec"]["replicas"] >= 2
        port = {p["name"]: p["port"] for p in services[tier]["spec"]["ports"]}["grpc"]
        assert gateway_env[f"GATEWAY_{tier.upper()}_ADDRESSES"] == f"dns:///{tier}:{port}"


def test_k8s_predictions_replicas_share_the_database_from_a_secret() -> None:
    deployment = by_kind("Deployment")["predictions"]
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    module = python_module(container["command"])
    assert module == "services.predictions"
    env = {item["name"]: item for item in container["env"]}
    check_service_env(module, {name: item.get("value", "") for name, item in env.items()})
    port = int(env["PREDICTIONS_PORT"]["value"])
    metrics = int(env["PREDICTIONS_METRICS_PORT"]["value"])
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == port
    assert container["livenessProbe"]["tcpSocket"]["port"] == port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": port, "metrics": metrics}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(metrics)}
    service = by_kind("Service")["predictions"]["spec"]
    assert service["clusterIP"] == "None"
    assert {p["name"]: p["port"] for p in service["ports"]} == {"grpc": port, "metrics": metrics}
    grpc_port = {p["name"]: p["port"] for p in by_kind("Service")["gateway"]["spec"]["ports"]}["grpc"]
    assert env["PREDICTIONS_GATEWAY_ADDRESS"]["value"] == f"gateway:{grpc_port}"

    # The database URL is never in the manifest itself; postgres.yaml's Secret holds it.
    reference = env["PREDICTIONS_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    secret = by_kind("Secret")[reference["name"]]["stringData"]
    url = secret[reference["key"]]
    user, password, database = secret["POSTGRES_USER"], secret["POSTGRES_PASSWORD"], secret["POSTGRES_DB"]
    postgres_service = by_kind("Service")["postgres"]["spec"]
    (pg_port,) = [p["port"] for p in postgres_service["ports"]]
    assert url == f"postgresql+psycopg://{user}:{password}@postgres:{pg_port}/{database}"
    statefulset = by_kind("StatefulSet")["postgres"]
    assert statefulset["spec"]["serviceName"] == "postgres" and postgres_service["clusterIP"] == "None"
    pg = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert pg["image"].split(":")[0] == compose()["services"]["postgres"]["image"].split(":")[0]
    pg_env = {item["name"]: item for item in pg["env"]}
    for name in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert pg_env[name]["valueFrom"]["secretKeyRef"] == {"name": reference["name"], "key": name}
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert {m["name"] for m in pg["volumeMounts"]} == {claim["metadata"]["name"]}

    envoy = by_kind("Deployment")["envoy"]["spec"]["template"]["spec"]["containers"][0]
    assert f"--predictions predictions:{port}" in " ".join(envoy["command"])
    playground = by_kind("Deployment")["playground"]["spec"]["template"]["spec"]["containers"][0]
    playground_env = {item["name"]: item.get("value") for item in playground["env"]}
    assert playground_env["PLAYGROUND_PREDICTIONS_ADDRESS"] == f"predictions:{port}"


def test_predictions_read_the_same_api_keys_as_the_gateway() -> None:
    # Keying the gateway alone would leave predictions, deployments and the webhook secret open.
    services = compose()["services"]
    gateway_keys = services["gateway"]["environment"]["GATEWAY_API_KEYS"]
    assert gateway_keys.startswith("${") and gateway_keys.endswith(":-}")
    assert services["predictions"]["environment"]["PREDICTIONS_API_KEYS"] == gateway_keys
    deployments = by_kind("Deployment")
    sources = {}
    for tier in ("gateway", "predictions"):
        container = deployments[tier]["spec"]["template"]["spec"]["containers"][0]
        env = {item["name"]: item for item in container["env"]}
        sources[tier] = env[f"{tier.upper()}_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert sources["gateway"] == sources["predictions"]
    # Optional: without the Secret both tiers start open, as `make run` does.
    assert sources["gateway"]["optional"] is True


def test_k8s_autoscalers_target_existing_deployments() -> None:
    deployments = by_kind("Deployment")
    autoscalers = by_kind("HorizontalPodAutoscaler")
    assert set(MODEL_TIERS) <= set(autoscalers)
    for autoscaler in autoscalers.values():
        target = autoscaler["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments
        assert autoscaler["spec"]["minReplicas"] <= autoscaler["spec"]["maxReplicas"]


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels only, which is all the manifests use) against labels."""
    assert selector is not None
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def admitted(
    policies: list[dict[str, Any]],
    target: dict[str, str],
    port: int,
    source: dict[str, str],
    source_namespace: str = "inference-stack",
) -> bool:
    """Whether NetworkPolicy semantics let a pod with `source` labels (in `source_namespace`)
    connect to `port` of a pod with `target` labels in the stack's namespace."""
    namespace_labels = {"kubernetes.io/metadata.name": source_namespace}
    selecting = [
        policy["spec"]
        for policy in policies
        if "Ingress" in policy["spec"]["policyTypes"] and selects(policy["spec"]["podSelector"], target)
    ]
    assert selecting, f"no policy selects {target}: the namespace would admit anything"
    for spec in selecting:
        for rule in spec.get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(
                item["port"] == port and item.get("protocol", "TCP") == "TCP" for item in ports
            ):
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                assert "ipBlock" not in peer
                if "namespaceSelector" in peer:
                    in_namespace = selects(peer["namespaceSelector"], namespace_labels)
                else:
                    in_namespace = source_namespace == "inference-stack"
                if in_namespace and selects(peer.get("podSelector", {}), source):
                    return True
    return False


def pod(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "inference-stack"}


def test_k8s_network_policies_let_only_the_gateway_reach_the_model_tiers() -> None:
    policies = list(by_kind("NetworkPolicy").values())
    deny = by_kind("NetworkPolicy")["default-deny-ingress"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    services = by_kind("Service")
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    everyone = ("gateway", "envoy", "playground", "predictions", "postgres", *MODEL_TIERS, "stranger")
    for tier in MODEL_TIERS:
        ports = {p["name"]: p["port"] for p in services[tier]["spec"]["ports"]}
        callers = {name for name in everyone if admitted(policies, pod(tier), ports["grpc"], pod(name))}
        assert callers == {"gateway"}, f"{tier} admits {callers}"
        assert not admitted(policies, pod(tier), ports["grpc"], pod("gateway"), "elsewhere")
        assert not admitted(policies, pod(tier), ports["grpc"], prometheus, "monitoring")
        assert admitted(policies, pod(tier), ports["metrics"], prometheus, "monitoring")
        assert not admitted(policies, pod(tier), ports["metrics"], pod("stranger"))
    gateway = {p["name"]: p["port"] for p in services["gateway"]["spec"]["ports"]}["grpc"]
    callers = {name for name in everyone if admitted(policies, pod("gateway"), gateway, pod(name))}
    assert callers == {"envoy", "playground", "predictions"}
    predictions = {p["name"]: p["port"] for p in services["predictions"]["spec"]["ports"]}["grpc"]
    callers = {name for name in everyone if admitted(policies, pod("predictions"), predictions, pod(name))}
    assert callers == {"envoy", "playground"}
    (postgres,) = [p["port"] for p in services["postgres"]["spec"]["ports"]]
    assert {name for name in everyone if admitted(policies, pod("postgres"), postgres, pod(name))} == {
        "predictions"
    }
    envoy = {p["name"]: p["port"] for p in services["envoy"]["spec"]["ports"]}["http"]
    assert admitted(policies, pod("envoy"), envoy, {}, "anywhere")
    # Every Deployment and StatefulSet is selected by a policy of its own besides the deny.
    for kind in ("Deployment", "StatefulSet"):
        for name, workload in by_kind(kind).items():
            labels = workload["spec"]["template"]["metadata"]["labels"]
            own = [
                p for p in policies if p["spec"]["podSelector"] and selects(p["spec"]["podSelector"], labels)
            ]
            assert own, f"{kind} {name} has no NetworkPolicy of its own"


def test_the_network_policy_check_tells_an_open_tier_from_a_closed_one() -> None:
    policies = copy.deepcopy(list(by_kind("NetworkPolicy").values()))
    generator = next(p for p in policies if p["metadata"]["name"] == "generator")
    generator["spec"]["ingress"][0]["from"].append({"podSelector": {"matchLabels": pod("envoy")}})
    assert admitted(policies, pod("generator"), 50052, pod("envoy"))
    generator["spec"]["ingress"][0].pop("from")
    assert admitted(policies, pod("generator"), 50052, {}, "anywhere")


# -- The playground (compose and Kubernetes alike) --------------------------------------------------


PLAYGROUND_PORT = "8501"
PLAYGROUND_HEALTH = "/_stcore/health"


def procfile_playground_command() -> list[str]:
    """The Procfile's playground command as compose and Kubernetes run it: without the shell's
    `exec`, on the default port."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("playground:"):
            words = shlex.split(line.split(":", 1)[1].replace("${PLAYGROUND_PORT:-8501}", PLAYGROUND_PORT))
            assert words[0] == "exec", line
            return words[1:]
    raise AssertionError("the Procfile has no playground")


def playground_variables() -> set[str]:
    """The PLAYGROUND_* variables the app's code reads."""
    code = " ".join(path.read_text() for path in (ROOT / "clients" / "playground").rglob("*.py"))
    return set(re.findall(r"\bPLAYGROUND_[A-Z_]+\b", code))


def test_the_playground_runs_the_procfile_command_against_the_gateway() -> None:
    command = procfile_playground_command()
    assert command[:3] == ["streamlit", "run", "clients/playground/app.py"]
    assert (ROOT / command[2]).is_file()
    assert command[command.index("--server.port") + 1] == PLAYGROUND_PORT
    known = playground_variables()
    assert {"PLAYGROUND_GATEWAY_ADDRESS", "PLAYGROUND_API_KEY"} <= known

    services = compose()["services"]
    playground = services["playground"]
    assert playground["command"] == command
    assert set(playground["environment"]) <= known
    gateway_port = services["gateway"]["environment"]["GATEWAY_PORT"]
    assert playground["environment"]["PLAYGROUND_GATEWAY_ADDRESS"] == f"gateway:{gateway_port}"
    assert f"{PLAYGROUND_PORT}:{PLAYGROUND_PORT}" in playground["ports"]
    health = playground["healthcheck"]["test"]
    assert health[1:4] == ["python", "-m", "tools.healthcheck"] and "--http" in health
    assert health[health.index("--port") + 1] == PLAYGROUND_PORT
    assert health[health.index("--path") + 1] == PLAYGROUND_HEALTH
    assert playground["depends_on"]["gateway"]["condition"] == "service_healthy"

    deployment = by_kind("Deployment")["playground"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == command
    env = {item["name"]: item for item in container["env"]}
    assert set(env) <= known
    grpc_port = {p["name"]: p["port"] for p in by_kind("Service")["gateway"]["spec"]["ports"]}["grpc"]
    assert env["PLAYGROUND_GATEWAY_ADDRESS"]["value"] == f"gateway:{grpc_port}"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(PLAYGROUND_PORT)}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": PLAYGROUND_HEALTH, "port": "http"}
    # Streamlit keeps each browser session in its process: more replicas need sticky sessions.
    assert deployment["spec"]["replicas"] == 1
    service_ports = {p["name"]: p["port"] for p in by_kind("Service")["playground"]["spec"]["ports"]}
    assert service_ports == {"http": int(PLAYGROUND_PORT)}


def test_the_playground_health_check_is_the_one_streamlit_answers(tmp_path: Path) -> None:
    """The health check compose runs, against `streamlit run` with the Procfile's flags: NOT
    ready before it listens, SERVING (exit 0) once it does."""
    health = compose()["services"]["playground"]["healthcheck"]["test"][1:]
    port = str(free_port())
    health[health.index("--port") + 1] = port
    check = [sys.executable, *health[1:]]
    assert subprocess.run(check, cwd=ROOT, capture_output=True, timeout=30).returncode == 1
    command = procfile_playground_command()
    command[command.index("--server.port") + 1] = port
    # A trivial app: the health route is Streamlit's, whatever the script.
    app = tmp_path / "app.py"
    app.write_text("import streamlit as st\n\nst.write('ok')\n")
    command[2] = str(app)
    streamlit = subprocess.Popen(
        [tool("streamlit"), *command[1:]],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            result = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=30)
            if result.returncode == 0:
                break
            assert streamlit.poll() is None, streamlit.communicate()[0]
            assert time.monotonic() < deadline, "streamlit not healthy after 90 s"
            time.sleep(0.5)
        assert result.stdout.strip() == "SERVING"
    finally:
        streamlit.terminate()
        output, _ = streamlit.communicate(timeout=30)
    # The flags keep its log to what matters: no welcome banner, no traceback.
    assert "You can now view" not in output and "Traceback" not in output, output


def test_k8s_cpu_overlay_removes_the_gpu_limits_it_names() -> None:
    overlay = yaml.safe_load((K8S / "cpu" / "kustomization.yaml").read_text())
    assert overlay["resources"] == [".."]
    deployments = by_kind("Deployment")
    for patch in overlay["patches"]:
        names = patch["target"]["name"].split("|")
        for operation in yaml.safe_load(patch["patch"]):
            assert operation["op"] == "remove"
            keys = [key.replace("~1", "/") for key in operation["path"].strip("/").split("/")]
            for name in names:
                node: Any = deployments[name]
                for key in keys:
                    node = node[int(key)] if isinstance(node, list) else node[key]


# -- Prometheus and Grafana -------------------------------------------------------------------------


# The keys Prometheus 2.x accepts (it refuses unknown ones) in the parts deploy/prometheus.yml uses.
PROMETHEUS_KEYS = {
    "": {
        "global",
        "scrape_configs",
        "scrape_config_files",
        "rule_files",
        "alerting",
        "remote_write",
        "remote_read",
        "storage",
        "tracing",
        "otlp",
    },
    "global": {
        "scrape_interval",
        "scrape_timeout",
        "evaluation_interval",
        "external_labels",
        "query_log_file",
        "body_size_limit",
        "sample_limit",
        "label_limit",
        "label_name_length_limit",
        "label_value_length_limit",
        "target_limit",
        "keep_dropped_targets",
        "rule_query_offset",
        "scrape_protocols",
    },
    "scrape_config": {
        "job_name",
        "honor_labels",
        "honor_timestamps",
        "track_timestamps_staleness",
        "scrape_interval",
        "scrape_timeout",
        "scrape_protocols",
        "metrics_path",
        "scheme",
        "params",
        "basic_auth",
        "authorization",
        "oauth2",
        "tls_config",
        "proxy_url",
        "follow_redirects",
        "enable_http2",
        "static_configs",
        "dns_sd_configs",
        "file_sd_configs",
        "http_sd_configs",
        "relabel_configs",
        "metric_relabel_configs",
        "sample_limit",
        "label_limit",
        "target_limit",
        "body_size_limit",
        "enable_compression",
        "keep_dropped_targets",
    },
    "dns_sd_config": {"names", "type", "port", "refresh_interval"},
    "static_config": {"targets", "labels"},
}
PROMETHEUS_DURATION = re.compile(r"^(0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$")
DURATION_SECONDS = {"y": 31536000, "w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}


def duration_seconds(text: str) -> float:
    return sum(int(n) * DURATION_SECONDS[unit] for n, unit in re.findall(r"(\d+)(ms|[ywdhms])", text))


def prometheus_problems(config: dict[str, Any]) -> list[str]:
    """What `promtool check config` would refuse in the parts of a config this project uses."""
    problems: list[str] = []

    def keys(where: str, node: dict[str, Any], kind: str) -> None:
        problems.extend(
            f"{where}: unknown field {key!r}" for key in sorted(set(node) - PROMETHEUS_KEYS[kind])
        )

    def duration(where: str, value: object) -> None:
        if not (isinstance(value, str) and value and PROMETHEUS_DURATION.match(value)):
            problems.append(f"{where}: {value!r} is not a duration")

    keys("top level", config, "")
    defaults = config.get("global", {})
    keys("global", defaults, "global")
    for field in ("scrape_interval", "scrape_timeout", "evaluation_interval"):
        if field in defaults:
            duration(f"global.{field}", defaults[field])
    jobs = config.get("scrape_configs", [])
    names = [job.get("job_name") for job in jobs]
    problems.extend(
        f"job {name!r} is defined twice" for name in sorted({n for n in names if names.count(n) > 1})
    )
    for job in jobs:
        where = f"job {job.get('job_name')!r}"
        if not job.get("job_name"):
            problems.append(f"{where}: job_name is empty")
        keys(where, job, "scrape_config")
        for field in ("scrape_interval", "scrape_timeout"):
            if field in job:
                duration(f"{where}.{field}", job[field])
        # An unset timeout is 10s, or the interval where that is shorter: only a set one can exceed.
        interval = job.get("scrape_interval", defaults.get("scrape_interval", "1m"))
        timeout = job.get("scrape_timeout", defaults.get("scrape_timeout"))
        if timeout and duration_seconds(str(timeout)) > duration_seconds(str(interval)):
            problems.append(f"{where}: scrape_timeout {timeout} exceeds scrape_interval {interval}")
        for sd in job.get("dns_sd_configs", []):
            keys(f"{where} dns_sd_configs", sd, "dns_sd_config")
            kind = sd.get("type", "SRV")
            if kind not in ("SRV", "A", "AAAA", "MX", "NS"):
                problems.append(f"{where}: invalid DNS-SD records type {kind!r}")
            if kind != "SRV" and not isinstance(sd.get("port"), int):
                problems.append(
                    f"{where}: a port is required in DNS-SD configs for all record types except SRV"
                )
            if not sd.get("names"):
                problems.append(f"{where}: DNS-SD config must contain at least one name")
        for static in job.get("static_configs", []):
            keys(f"{where} static_configs", static, "static_config")
            for target in static.get("targets", []):
                if "/" in target or not re.fullmatch(r"[^:\s]+(:\d+)?", target):
                    problems.append(f"{where}: {target!r} is not a valid host:port target")
    return problems


def test_prometheus_config_is_one_prometheus_accepts() -> None:
    assert prometheus_problems(yaml.safe_load(PROMETHEUS.read_text())) == []


def test_the_prometheus_check_refuses_what_promtool_refuses() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    broken = copy.deepcopy(config)
    broken["global"]["scrape_intervall"] = "5s"
    broken["scrape_configs"][0]["dns_sd_configs"][0].pop("port")
    broken["scrape_configs"][1]["scrape_timeout"] = "1m"
    broken["scrape_configs"][2]["job_name"] = broken["scrape_configs"][0]["job_name"]
    broken["scrape_configs"][-1]["static_configs"][0]["targets"] = ["http://localhost:9090/metrics"]
    problems = "\n".join(prometheus_problems(broken))
    for expected in (
        "scrape_intervall",
        "a port is required",
        "exceeds scrape_interval",
        "defined twice",
        "host:port",
    ):
        assert expected in problems


def test_prometheus_scrapes_every_tier_on_its_metrics_port() -> None:
    jobs = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    services = compose()["services"]
    for tier in ("gateway", *MODEL_TIERS, "predictions"):
        (target,) = jobs[tier]["dns_sd_configs"]
        assert target["names"] == [tier]
        assert str(target["port"]) == services[tier]["environment"][f"{tier.upper()}_METRICS_PORT"]


def exported_metric_names() -> set[str]:
    """Names passed to prometheus_client metric constructors anywhere in services/."""
    names: set[str] = set()
    pattern = re.compile(
        r"\b(?:Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*[\"']([a-zA-Z_:][\w:]*)[\"']", re.S
    )
    for path in (ROOT / "services").rglob("*.py"):
        names.update(pattern.findall(path.read_text()))
    return names


def series_names(metric: str) -> set[str]:
    """What prometheus_client exposes for a metric of this name."""
    base = metric.removesuffix("_total")
    return {
        metric,
        base,
        f"{base}_total",
        f"{base}_created",
        f"{base}_bucket",
        f"{base}_sum",
        f"{base}_count",
    }


def test_dashboard_queries_only_metrics_the_services_export() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = set().union(*(series_names(name) for name in exported_metric_names()))
    assert exported, "no prometheus_client metric found under services/"
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in (
        "tokens per second",
        "time to first token",
        "queue depth",
        "batch size",
        "errors",
        "cache hits",
    ):
        assert topic in titles, f"the dashboard has no panel on {topic}"
    queried: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus"
            queried.update(re.findall(r"\b((?:gateway|generator|embedder)_[a-z0-9_]+)", target["expr"]))
    missing = sorted(queried - exported)
    assert not missing, f"the dashboard queries metrics no service exports: {missing}"


# -- docs -------------------------------------------------------------------------------------------


def test_docs_configuration_tables_match_the_code() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tools.config_tables", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- What the images install ------------------------------------------------------------------------


def runtime_closure() -> set[str]:
    """The distributions a runtime install (`pip install ./clients/python .`, as in the image)
    brings: the project's dependencies and theirs, without the dev extra."""

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    # The project's own requirements from its pyproject files: an editable install's metadata
    # is as old as the last `make install`.
    declared = {
        canonical(project["name"]): project["dependencies"]
        for project in (
            tomllib.loads(path.read_text())["project"]
            for path in (ROOT / "pyproject.toml", ROOT / "clients" / "python" / "pyproject.toml")
        )
    }
    seen: set[str] = set()
    pending = list(declared)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = declared.get(name) or importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for requirement in requirements:
            if "extra ==" in requirement:
                continue
            match = re.match(r"[A-Za-z0-9_.-]+", requirement)
            if match:
                pending.append(canonical(match.group(0)))
    return seen


def module_level_imports(path: Path) -> set[str]:
    """Top-level names imported when the module loads (an import inside a function is an
    optional feature's and is left out)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_import_of_the_services_is_a_runtime_dependency() -> None:
    playground = sorted((ROOT / "clients" / "playground").rglob("*.py"))
    # `streamlit run` puts the app's folder on sys.path: its modules import each other by name.
    first_party = {"services", "inference", "inference_client", "tools", *(path.stem for path in playground)}
    sources = [
        *(ROOT / "services").rglob("*.py"),
        *playground,
        ROOT / "tools" / "healthcheck.py",
        ROOT / "tools" / "envoy_config.py",
    ]
    imported: dict[str, Path] = {}
    for path in sources:
        for name in module_level_imports(path) - first_party:
            if name not in sys.stdlib_module_names:
                imported.setdefault(name, path)
    distributions = importlib.metadata.packages_distributions()
    closure = runtime_closure()
    missing = []
    for module, path in sorted(imported.items()):
        provided = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(module, [])}
        if not provided & closure:
            missing.append(f"{module} (imported by {path.relative_to(ROOT)}; from {sorted(provided) or '?'})")
    assert not missing, "imported at run time but not a dependency in pyproject.toml: " + ", ".join(missing)


def test_the_gateways_share_rate_limits_in_a_redis_only_they_reach() -> None:
    services = compose()["services"]
    redis, gateway = services["redis"], services["gateway"]
    assert redis["image"].startswith("redis:7")
    assert "ports" not in redis and "6379" in redis["expose"]
    # Counters that refill by themselves: nothing to persist.
    assert redis["command"][:5] == ["redis-server", "--save", "", "--appendonly", "no"]
    assert gateway["environment"]["GATEWAY_REDIS_URL"] == "redis://redis:6379/0"
    assert "redis" in gateway["depends_on"]
    deployment = by_kind("Deployment")["redis"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == redis["image"]
    assert container["args"] == redis["command"][1:]
    (port,) = [p["port"] for p in by_kind("Service")["redis"]["spec"]["ports"]]
    k8s_gateway = by_kind("Deployment")["gateway"]["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value", "") for item in k8s_gateway["env"]}
    assert env["GATEWAY_REDIS_URL"] == f"redis://redis:{port}/0"
    policy = by_kind("NetworkPolicy")["redis"]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "redis"}
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}}]


# Each tier's own shutdown grace: its configuration field, and the variable that overrides it.
SHUTDOWN_GRACES = {
    "generator": ("services.generator.config", "GeneratorConfig", "shutdown_grace_seconds"),
    "embedder": ("services.embedder.config", "EmbedderConfig", "shutdown_grace_s"),
    "gateway": ("services.gateway.config", "GatewayConfig", "shutdown_grace_s"),
}
# The predictions service waits this long for running predictions on SIGTERM (server.stop()).
PREDICTIONS_STOP_GRACE_S = 5.0
# What a kill timeout must leave beyond the tier's grace (the process still closes channels,
# flushes its logs and exits after the grace).
KILL_MARGIN_S = 3.0


def shutdown_grace(tier: str, env: dict[str, str]) -> float:
    """The tier's grace in seconds: its variable in `env` where set, else its default."""
    if tier == "predictions":
        return PREDICTIONS_STOP_GRACE_S
    import dataclasses
    import importlib

    module, name, field_name = SHUTDOWN_GRACES[tier]
    config = getattr(importlib.import_module(module), name)
    variable = f"{tier.upper()}_{field_name.upper()}"
    if env.get(variable):
        return float(env[variable])
    default = next(item.default for item in dataclasses.fields(config) if item.name == field_name)
    assert isinstance(default, float)
    return default


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", text)
    assert match and text, f"not a compose duration: {text!r}"
    return int(match.group(1) or 0) * 60 + float(match.group(2) or 0)


def test_kill_timeouts_leave_every_tier_its_shutdown_grace() -> None:
    deployments = by_kind("Deployment")
    services = compose()["services"]
    for tier in ("generator", "embedder", "gateway", "predictions"):
        container = deployments[tier]["spec"]["template"]["spec"]["containers"][0]
        env = {item["name"]: item.get("value", "") for item in container.get("env", [])}
        # Kubernetes' default is 30 s.
        kill = deployments[tier]["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        grace = shutdown_grace(tier, env)
        assert kill >= grace + KILL_MARGIN_S, f"k8s {tier}: killed {kill}s after SIGTERM, grace {grace}s"
        service = services[tier]
        compose_env = {key: str(value) for key, value in (service.get("environment") or {}).items()}
        # Compose's default is 10 s.
        stop = _seconds(str(service.get("stop_grace_period", "10s")))
        grace = shutdown_grace(tier, compose_env)
        assert stop >= grace + KILL_MARGIN_S, f"compose {tier}: killed {stop}s after SIGTERM, grace {grace}s"
