"""tools/run.py's plan for the playground: started with the gateway, pointed at it, probed on
Streamlit's health route, and named in the banner; skipped, with the reason, where it cannot
run. No process is started."""

from __future__ import annotations

import shutil
from pathlib import Path

from services.common import tls
from tools.run import PLAYGROUND_APP, ROOT, Plan, Tier, banner, jwt_env, make_plan


def plan_for(root: Path, run_dir: Path, procfile: str = "", **environ: str) -> Plan:
    path = run_dir / "Procfile"
    path.write_text(procfile or (ROOT / "Procfile").read_text())
    return make_plan(environ, run_dir, path, root=root)


def playground(plan: Plan) -> Tier | None:
    return next((tier for tier in plan.tiers if tier.name == "playground"), None)


def test_the_playground_runs_with_the_gateway_on_its_port(tmp_path: Path) -> None:
    plan = plan_for(ROOT, tmp_path, PLAYGROUND_PORT="18501", GATEWAY_PORT="15051")
    tier = playground(plan)
    assert tier is not None, plan.skipped
    assert (tier.port, tier.probe, tier.health_path, tier.metrics_port) == (
        18501,
        "http",
        "/_stcore/health",
        None,
    )
    assert plan.env["PLAYGROUND_GATEWAY_ADDRESS"] == "127.0.0.1:15051"
    assert "streamlit run clients/playground/app.py" in tier.command
    text = banner(plan, 3.0, "model")
    assert "Playground (browser)       http://localhost:18501" in text
    # It has no metrics port: no "metrics" line for it.
    assert "playground gRPC" not in text


def test_a_playground_address_of_ones_own_is_kept(tmp_path: Path) -> None:
    plan = plan_for(ROOT, tmp_path, PLAYGROUND_GATEWAY_ADDRESS="elsewhere:50051")
    assert playground(plan) is not None
    assert plan.env["PLAYGROUND_GATEWAY_ADDRESS"] == "elsewhere:50051"
    assert plan.env["PLAYGROUND_PORT"] == "8501"


def test_the_playground_is_skipped_without_its_app_or_the_gateway(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name in ("gateway", "generator", "embedder"):
        (root / "services" / name).mkdir(parents=True)
        (root / "services" / name / "__main__.py").write_text("")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    plan = plan_for(root, run_dir)
    assert playground(plan) is None
    assert f"playground ({PLAYGROUND_APP} does not exist yet)" in plan.skipped

    (root / PLAYGROUND_APP).parent.mkdir(parents=True)
    (root / PLAYGROUND_APP).write_text("")
    shutil.rmtree(root / "services" / "gateway")
    plan = plan_for(root, run_dir)
    assert playground(plan) is None
    assert "playground (no gateway to talk to)" in plan.skipped


def fake_root(tmp_path: Path, services: tuple[str, ...]) -> Path:
    root = tmp_path / "root"
    for name in services:
        (root / "services" / name).mkdir(parents=True)
        (root / "services" / name / "__main__.py").write_text("")
    return root


def test_the_predictions_service_is_wired_to_the_gateway_envoy_and_a_sqlite_file(tmp_path: Path) -> None:
    root = fake_root(tmp_path, ("gateway", "generator", "embedder", "predictions"))
    (root / PLAYGROUND_APP).parent.mkdir(parents=True)
    (root / PLAYGROUND_APP).write_text("")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    plan = plan_for(
        root, run_dir, GATEWAY_PORT="15051", ENVOY_PORT="18080", GATEWAY_API_KEYS_FILE="/keys.json"
    )
    tier = next(tier for tier in plan.tiers if tier.name == "predictions")
    assert (tier.port, tier.metrics_port, tier.probe) == (50054, 9104, "grpc")
    assert tier.command == "exec python -m services.predictions"
    env = plan.env
    assert env["PREDICTIONS_GATEWAY_ADDRESS"] == "127.0.0.1:15051"
    assert env["PREDICTIONS_PUBLIC_URL"] == "http://localhost:18080"
    assert env["PREDICTIONS_ALLOW_PRIVATE_WEBHOOKS"] == "1"
    assert env["PREDICTIONS_API_KEYS_FILE"] == "/keys.json" and "PREDICTIONS_API_KEYS" not in env
    assert env["PREDICTIONS_DATABASE_URL"] == f"sqlite+aiosqlite:///{run_dir.absolute()}/predictions.db"
    assert env["PLAYGROUND_PREDICTIONS_ADDRESS"] == "127.0.0.1:50054"
    # Envoy sends PredictionService's routes to it.
    assert 'address: "127.0.0.1", port_value: 50054' in Path(env["ENVOY_CONFIG"]).read_text()
    text = banner(plan, 3.0, "model-x")
    assert "predictions gRPC" in text and "http://localhost:9104/metrics" in text
    assert "curl -s http://localhost:18080/v1/predictions" in text and "prefer: wait=60" in text


def test_predictions_settings_of_ones_own_are_kept_and_other_ports_get_their_own_database(
    tmp_path: Path,
) -> None:
    root = fake_root(tmp_path, ("gateway", "predictions"))
    plan = plan_for(root, tmp_path, PREDICTIONS_PORT="15054", PREDICTIONS_ALLOW_PRIVATE_WEBHOOKS="0")
    assert plan.env["PREDICTIONS_ALLOW_PRIVATE_WEBHOOKS"] == "0"
    assert plan.env["PREDICTIONS_DATABASE_URL"].endswith("/predictions-15054.db")
    url = "postgresql+psycopg://app@db:5432/predictions"
    plan = plan_for(root, tmp_path, PREDICTIONS_DATABASE_URL=url)
    assert plan.env["PREDICTIONS_DATABASE_URL"] == url


def test_predictions_are_skipped_without_a_gateway(tmp_path: Path) -> None:
    root = fake_root(tmp_path, ("generator", "predictions"))
    plan = plan_for(root, tmp_path)
    assert not any(tier.name == "predictions" for tier in plan.tiers)
    assert "predictions (no gateway to run predictions through)" in plan.skipped
    assert "PREDICTIONS_DATABASE_URL" not in plan.env


def test_the_grpc_tiers_listen_on_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    root = fake_root(tmp_path, ("gateway", "generator", "embedder", "predictions"))
    plan = plan_for(root, tmp_path, EMBEDDER_HOST="0.0.0.0")
    env = plan.env
    assert [env[f"{name}_HOST"] for name in ("GATEWAY", "GENERATOR", "PREDICTIONS")] == ["127.0.0.1"] * 3
    # A host of one's own is kept (a deliberate choice, e.g. a machine of its own behind a firewall).
    assert env["EMBEDDER_HOST"] == "0.0.0.0"
    assert "ENVOY_HOST" not in env and all(tier.tls_files == tls.PLAINTEXT for tier in plan.tiers)


def test_stack_tls_files_put_every_tier_and_envoy_on_mutual_tls(tmp_path: Path) -> None:
    root = fake_root(tmp_path, ("gateway", "generator", "embedder", "predictions"))
    # Envoy's rendering checks the files exist; nothing reads them here.
    pki = tmp_path / "pki"
    pki.mkdir()
    for name in ("ca.pem", "tier.crt", "tier.key", "gateway.crt"):
        (pki / name).write_text("")
    files = {
        "STACK_TLS_CA": f"{pki}/ca.pem",
        "STACK_TLS_CERT": f"{pki}/tier.crt",
        "STACK_TLS_KEY": f"{pki}/tier.key",
    }
    plan = plan_for(root, tmp_path, GATEWAY_TLS_CERT=f"{pki}/gateway.crt", **files)
    env = plan.env
    for prefix in ("GENERATOR", "EMBEDDER", "PREDICTIONS", "PLAYGROUND", "ENVOY_UPSTREAM"):
        assert [env[f"{prefix}_TLS_{part}"] for part in ("CA", "CERT", "KEY")] == list(files.values())
    assert env["GATEWAY_TLS_CERT"] == f"{pki}/gateway.crt"
    # Each tier is probed with its own files.
    probes = {tier.name: tier.tls_files for tier in plan.tiers}
    assert probes["generator"] == tls.TlsFiles(*files.values())
    assert probes["gateway"] == tls.TlsFiles(f"{pki}/ca.pem", f"{pki}/gateway.crt", f"{pki}/tier.key")
    text = banner(plan, 1.0, "model")
    assert f"grpcurl -cacert {pki}/ca.pem -cert {pki}/gateway.crt -key {pki}/tier.key" in text


def test_the_tiers_trust_only_the_claims_header_envoy_strips(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    environ = {
        "ENVOY_JWT_ISSUER": "https://issuer.example",
        "ENVOY_JWT_AUDIENCES": "inference",
        "ENVOY_JWT_JWKS_FILE": str(jwks),
        "GATEWAY_JWT_CLAIMS_HEADER": "x-claims",
        "PREDICTIONS_JWT_CLAIMS_HEADER": "x-other",
    }
    env = dict(environ)
    jwt_env(env)
    assert env["GATEWAY_JWT_CLAIMS_HEADER"] == env["PREDICTIONS_JWT_CLAIMS_HEADER"] == "x-jwt-payload"
