"""The soak: the whole stack (generator, embedder, gateway, predictions, Envoy) under mixed load
for SOAK_SECONDS (default 600; `make soak`): REST chat streams and unary calls, completions,
embeddings, native gRPC through Envoy, a few predictions, and clients that leave mid-stream.
After the warm-up (the first 20%), each tier's RSS grows under 10%, its open file descriptors
stay within a small constant, and no error is counted (no 5xx, no failure in any tier's
metrics beyond the deliberate disconnects)."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import httpx2
import psutil
import pytest
from inference.v1 import common_pb2, generation_pb2, generation_pb2_grpc, info_pb2, info_pb2_grpc

from tests.fixtures_embedder import start_embedder
from tests.fixtures_gateway import (
    GatewayService,
    descriptor_for_envoy,
    start_envoy,
    start_gateway,
    write_key_file,
)
from tests.fixtures_generator import start_generator
from tests.fixtures_predictions import sqlite_url, start_predictions
from tests.reliability.figures import report
from tests.stack import ServiceProcess, metric_samples

pytestmark = pytest.mark.soak

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
WARM_UP = 0.2
# RSS may grow this much after the warm-up; open descriptors may differ by this many.
RSS_GROWTH_LIMIT = 0.10
FD_SLACK = 24
PREFIX_CACHE_MIB = 16
RESPONSE_CACHE_ENTRIES = 64
TIERS = ("envoy", "gateway", "generator", "embedder", "predictions")
# gRPC codes that are no failure: success, and the deliberate disconnects.
CLEAN_CODES = {"OK", "CANCELLED", "ok", "cancelled"}


@dataclass
class SoakStack:
    url: str
    grpc_target: str
    headers: dict[str, str]
    metadata: tuple[tuple[str, str], ...]
    generator_address: str
    processes: dict[str, ServiceProcess]
    metrics_ports: dict[str, int]
    models: dict[str, str] = field(default_factory=dict)
    envoy_admin: int = 0


@pytest.fixture(scope="module")
def soak_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoakStack]:
    """A stack of its own, so that its processes carry this module's load only."""
    started: list[ServiceProcess] = []
    try:
        # Bounded caches small enough to reach their bound within the warm-up (the prefix cache's
        # 256 MiB default would fill for most of a 10-minute soak): growth after it is a leak.
        generator = start_generator(["--prefix-cache-mib", str(PREFIX_CACHE_MIB)])
        started.append(generator.process)
        embedder = start_embedder()
        started.append(embedder.process)
        keys_file = tmp_path_factory.mktemp("soak-keys") / "keys.json"
        keys = write_key_file(keys_file)
        gateway_process, gateway_address, gateway_metrics = start_gateway(
            generator.address,
            embedder.address,
            ("--api-keys-file", str(keys_file), "--cache-size", str(RESPONSE_CACHE_ENTRIES)),
        )
        started.append(gateway_process)
        gateway = GatewayService(gateway_address, gateway_metrics, gateway_process, keys, keys_file)
        database = sqlite_url(tmp_path_factory.mktemp("soak-predictions"))
        predictions = start_predictions(gateway, database, "soak-predictions")
        started.append(predictions.process)
        envoy = start_envoy(
            gateway_address,
            tmp_path_factory.mktemp("soak-envoy"),
            name="soak-envoy",
            descriptor=descriptor_for_envoy(),
            predictions_address=predictions.address,
        )
        started.append(envoy.process)
        stack = SoakStack(
            url=envoy.url,
            grpc_target=envoy.url.removeprefix("http://"),
            headers=gateway.headers("user"),
            metadata=gateway.metadata("user"),
            generator_address=generator.address,
            processes={
                "envoy": envoy.process,
                "gateway": gateway_process,
                "generator": generator.process,
                "embedder": embedder.process,
                "predictions": predictions.process,
            },
            metrics_ports={
                "gateway": gateway_metrics,
                "generator": generator.metrics_port,
                "embedder": embedder.metrics_port,
                "predictions": predictions.metrics_port,
            },
            envoy_admin=envoy.admin_port,
        )
        with httpx2.Client(base_url=stack.url, headers=stack.headers, timeout=60) as client:
            for model in client.get("/models").json()["models"]:
                stack.models.setdefault(model["task"], model["id"])
        yield stack
    finally:
        for process in reversed(started):
            process.stop()


# --- what the tiers count ----------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(name, tuple(sorted(labels.items()))): value for name, labels, value in metric_samples(port)}


def envoy_stats(admin_port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats?format=json", timeout=30) as reply:
        stats = json.load(reply)["stats"]
    return {item["name"]: int(item["value"]) for item in stats if "value" in item}


def failure_counts(stack: SoakStack) -> dict[str, float]:
    """Every counter of a failure in any tier, by a readable name (absent ones are 0)."""
    counts: dict[str, float] = {}

    def add(name: str, value: float) -> None:
        counts[name] = counts.get(name, 0.0) + value

    for tier, port in stack.metrics_ports.items():
        for (name, labels), value in scrape(port).items():
            label = dict(labels)
            code = label.get("code", label.get("outcome"))
            if name in (
                "gateway_requests_total",
                "generator_requests_total",
                "embedder_requests_total",
                "predictions_requests_total",
            ):
                if code not in CLEAN_CODES:
                    add(f"{name}{{{code}}}", value)
            elif name in (
                "gateway_backend_errors_total",
                "gateway_rate_limit_rejections_total",
                "generator_requests_rejected_total",
                "embedder_rejected_total",
                "predictions_queue_full_total",
            ):
                add(f"{tier}:{name}", value)
    with grpc.insecure_channel(stack.generator_address) as channel:
        reply = info_pb2_grpc.InfoServiceStub(channel).GetStats(info_pb2.GetStatsRequest(), timeout=30)
    add("generator GetStats requests_failed", reply.components[0].requests_failed)
    stats = envoy_stats(stack.envoy_admin)
    for name in ("http.api.downstream_rq_5xx", "cluster.gateway.upstream_rq_5xx"):
        add(f"envoy {name}", stats.get(name, 0))
    return counts


# --- the load -----------------------------------------------------------------------------------


class Tally:
    """What the clients saw: requests by kind and outcome, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.problems: list[str] = []

    def ok(self, kind: str) -> None:
        with self._lock:
            self.outcomes[f"{kind}:ok"] += 1

    def bad(self, kind: str, what: str) -> None:
        with self._lock:
            self.outcomes[f"{kind}:bad"] += 1
            if len(self.problems) < 20:
                self.problems.append(f"{kind}: {what}")

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    @property
    def errors(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k.endswith(":bad"))


def sse_events(reply: httpx2.Response) -> list[str]:
    return [line[len("data: ") :] for line in reply.iter_lines() if line.startswith("data: ")]


def run_load(stack: SoakStack, until: float, tally: Tally) -> list[threading.Thread]:
    """Starts the clients (one thread each), looping until `until` (monotonic)."""
    model = stack.models["generation"]
    embedding_model = stack.models["embedding"]
    counter = iter(range(10**9))
    lock = threading.Lock()

    def serial() -> int:
        with lock:
            return next(counter)

    def chat(n: int) -> list[dict[str, str]]:
        # Distinct prompts, with some repeats, so that the response cache both hits and fills.
        return [{"role": "user", "content": f"Tell me fact number {n % 400} about the sea."}]

    def native_stream(client: httpx2.Client) -> None:
        body = {"messages": chat(serial()), "stream": True, "parameters": {"max_new_tokens": 16}}
        with client.stream("POST", "/chat", json=body) as reply:
            if reply.status_code != 200:
                tally.bad("native_stream", f"{reply.status_code} {reply.read()[:200]!r}")
                return
            events = sse_events(reply)
        if events[-1:] != ["[DONE]"] or any('"error"' in e for e in events):
            tally.bad("native_stream", repr(events[-2:]))
        else:
            tally.ok("native_stream")

    def openai_stream(client: httpx2.Client) -> None:
        body = {"model": model, "messages": chat(serial()), "stream": True, "max_tokens": 16}
        with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            if reply.status_code != 200:
                tally.bad("openai_stream", f"{reply.status_code} {reply.read()[:200]!r}")
                return
            events = sse_events(reply)
        if events[-1:] != ["[DONE]"] or any('"error"' in e for e in events):
            tally.bad("openai_stream", repr(events[-2:]))
        else:
            tally.ok("openai_stream")

    def unary_chat(client: httpx2.Client) -> None:
        n = serial()
        body = {"model": model, "messages": chat(n), "max_tokens": 12, "temperature": 0}
        reply = client.post("/v1/chat/completions", json=body)
        if reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None:
            tally.ok("unary_chat")
        else:
            tally.bad("unary_chat", f"{reply.status_code} {reply.text[:200]}")

    def completion(client: httpx2.Client) -> None:
        body = {"model": model, "prompt": f"Number {serial()} is", "max_tokens": 12, "temperature": 0.7}
        reply = client.post("/v1/completions", json=body)
        if reply.status_code == 200 and reply.json()["choices"]:
            tally.ok("completion")
        else:
            tally.bad("completion", f"{reply.status_code} {reply.text[:200]}")

    def embeddings(client: httpx2.Client) -> None:
        n = serial()
        body = {"model": embedding_model, "input": [f"sentence {n} {i}" for i in range(8)]}
        reply = client.post("/v1/embeddings", json=body)
        if reply.status_code == 200 and len(reply.json()["data"]) == 8:
            tally.ok("embeddings")
        else:
            tally.bad("embeddings", f"{reply.status_code} {reply.text[:200]}")

    def dropped_stream(client: httpx2.Client) -> None:
        """A client that leaves after three events of a long story (deliberate: not an error)."""
        body = {
            "messages": [{"role": "user", "content": f"Write a long story number {serial()}."}],
            "stream": True,
            "parameters": {"max_new_tokens": 400},
        }
        with client.stream("POST", "/chat", json=body) as reply:
            if reply.status_code != 200:
                tally.bad("dropped_stream", f"{reply.status_code}")
                return
            for count, _ in enumerate(line for line in reply.iter_lines() if line.startswith("data: ")):
                if count == 2:
                    break
        tally.ok("dropped_stream")

    def prediction(client: httpx2.Client) -> None:
        body = {
            "model": model,
            "input": {"prompt": f"Prediction {serial()}: once", "parameters": {"max_new_tokens": 12}},
        }
        reply = client.post("/v1/predictions", json=body, headers={"prefer": "wait=60"})
        if reply.status_code != 201:
            tally.bad("prediction", f"{reply.status_code} {reply.text[:200]}")
            return
        created = reply.json()
        deadline = time.monotonic() + 120
        while created["status"] not in ("succeeded", "failed", "canceled") and time.monotonic() < deadline:
            time.sleep(0.5)
            created = client.get(f"/v1/predictions/{created['id']}").json()
        if created["status"] == "succeeded":
            tally.ok("prediction")
        else:
            tally.bad("prediction", f"{created['status']} {created.get('error')}")
        time.sleep(5)  # a few predictions, not a stream of them

    def grpc_calls(channel: grpc.Channel) -> None:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        request = generation_pb2.GenerateStreamRequest(
            prompt=f"gRPC story {serial()}:", parameters=common_pb2.SamplingParameters(max_new_tokens=12)
        )
        try:
            replies = list(stub.GenerateStream(request, metadata=stack.metadata, timeout=120))
        except grpc.RpcError as error:
            tally.bad("grpc_stream", f"{error.code()} {error.details()}")
            return
        if replies and replies[-1].HasField("usage"):
            tally.ok("grpc_stream")
        else:
            tally.bad("grpc_stream", "no usage on the last message")

    def http_client(step: Callable[[httpx2.Client], None]) -> Callable[[], None]:
        def loop() -> None:
            with httpx2.Client(base_url=stack.url, headers=stack.headers, timeout=120) as client:
                while time.monotonic() < until:
                    try:
                        step(client)
                    except Exception as error:  # a client-side failure is an error of the soak
                        tally.bad(step.__name__, f"{type(error).__name__}: {error}")
                        time.sleep(1)

        return loop

    def grpc_client() -> None:
        with grpc.insecure_channel(stack.grpc_target) as channel:
            while time.monotonic() < until:
                grpc_calls(channel)

    def dropping_client() -> None:
        # A fresh connection per dropped stream, as a client that goes away would.
        while time.monotonic() < until:
            with httpx2.Client(base_url=stack.url, headers=stack.headers, timeout=120) as client:
                try:
                    dropped_stream(client)
                except Exception as error:
                    tally.bad("dropped_stream", f"{type(error).__name__}: {error}")
            time.sleep(2)

    loops: list[Callable[[], None]] = [
        http_client(native_stream),
        http_client(openai_stream),
        http_client(unary_chat),
        http_client(completion),
        http_client(embeddings),
        http_client(prediction),
        grpc_client,
        dropping_client,
    ]
    threads = [threading.Thread(target=loop, daemon=True) for loop in loops]
    for thread in threads:
        thread.start()
    return threads


# --- the soak ------------------------------------------------------------------------------------


@dataclass
class Sample:
    at: float
    rss: dict[str, int]
    fds: dict[str, int]


def sample(processes: dict[str, psutil.Process]) -> Sample:
    return Sample(
        time.monotonic(),
        {tier: p.memory_info().rss for tier, p in processes.items()},
        {tier: p.num_fds() for tier, p in processes.items()},
    )


def growth(values: list[int]) -> float:
    """Relative growth from the first samples after the warm-up to the last ones (medians of
    three, so that one sample between two garbage collections does not decide)."""
    first = statistics.median(values[:3])
    last = statistics.median(values[-3:])
    return (last - first) / first


# The suite's 600 s limit per test is shorter than the soak itself.
@pytest.mark.timeout(SOAK_SECONDS + 600)
def test_soak_memory_and_descriptors_stay_flat_and_nothing_fails(soak_stack: SoakStack) -> None:
    processes = {tier: psutil.Process(soak_stack.processes[tier].pid) for tier in TIERS}
    before = failure_counts(soak_stack)
    tally = Tally()
    started = time.monotonic()
    until = started + SOAK_SECONDS
    threads = run_load(soak_stack, until, tally)
    every = max(2.0, SOAK_SECONDS / 100)
    samples: list[Sample] = []
    while time.monotonic() < until:
        time.sleep(every)
        if time.monotonic() - started >= WARM_UP * SOAK_SECONDS:
            samples.append(sample(processes))
    for thread in threads:
        thread.join(timeout=180)
    assert not any(thread.is_alive() for thread in threads), "a client hung past the soak"
    after = failure_counts(soak_stack)
    new_failures = {
        name: after[name] - before.get(name, 0.0) for name in after if after[name] != before.get(name, 0.0)
    }

    rss = {tier: growth([s.rss[tier] for s in samples]) for tier in TIERS}
    fds = {tier: max(s.fds[tier] for s in samples) - min(s.fds[tier] for s in samples) for tier in TIERS}
    mib = {tier: samples[-1].rss[tier] / 2**20 for tier in TIERS}
    report(
        "soak",
        seconds=SOAK_SECONDS,
        requests=tally.requests,
        **{f"rss_growth_{tier}": round(rss[tier], 4) for tier in TIERS},
        **{f"rss_mib_{tier}": round(mib[tier], 1) for tier in TIERS},
        **{f"fds_{tier}": fds[tier] for tier in TIERS},
        errors=tally.errors + int(sum(new_failures.values())),
    )
    print(f"soak outcomes: {dict(sorted(tally.outcomes.items()))}")
    shown = samples[:: max(1, len(samples) // 10)]
    for tier in TIERS:
        trend = [round(s.rss[tier] / 2**20, 1) for s in shown]
        print(f"soak rss MiB {tier}: {trend}; fds {[s.fds[tier] for s in shown]}")
    assert len(samples) >= 6, "too few samples after the warm-up: raise SOAK_SECONDS"
    assert tally.errors == 0, tally.problems
    assert new_failures == {}, new_failures
    assert all(
        tally.outcomes[f"{kind}:ok"] > 0
        for kind in ("native_stream", "embeddings", "grpc_stream", "prediction", "dropped_stream")
    ), tally.outcomes
    assert all(rss[tier] < RSS_GROWTH_LIMIT for tier in TIERS), rss
    assert all(fds[tier] <= FD_SLACK for tier in TIERS), fds
