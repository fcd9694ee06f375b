"""The gateway's pools by model without a process: discovery with ListServedModels on every replica,
a request going only to a replica of its model, the union of the models with replica counts,
RESOURCE_EXHAUSTED retried on a replica not tried yet, the outstanding count, and the embedder's
cache calls fanned out to every replica serving the model."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from inference.v1 import embedding_pb2, generation_pb2, info_pb2

from services.common import tls
from services.common.interceptors import Context
from services.gateway import routing
from services.gateway.backends import Backend, Backends, Replica, ResponseCache
from services.gateway.catalog import ModelCatalog
from services.gateway.errors import GatewayError
from tests.test_mtls import Authority, make_ca
from tests.unit.fakes import eventually, within

HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
LIST_MODELS = "/inference.v1.InfoService/ListServedModels"
WATCH_LOAD = "/inference.v1.InfoService/WatchLoad"


def error(code: grpc.StatusCode, details: str = "fake") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class FakeReplica:
    """A channel to one fake replica: it lists `models`, answers `replies[method]` (an empty reply
    by default) or fails with `fail_with`, streams three messages, and its health Watch reports what
    the test puts in `health`."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.models: list[str] | None = None  # None: ListServedModels fails (not answered yet)
        self.replies: dict[str, Message] = {}
        self.fail_with: grpc.StatusCode | None = None
        self.calls: list[str] = []
        self.health: asyncio.Queue[int] = asyncio.Queue()
        self.hold = asyncio.Event()  # set: calls return at once; clear: they wait for it
        self.hold.set()
        self.list_delay = 0.0  # how long ListServedModels takes
        self.listed = 0  # ListServedModels calls
        self.timeouts: list[float | None] = []  # the timeout of each call but ListServedModels
        self.closes: list[float | None] = []  # the grace of each close

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return grpc.ChannelConnectivity.READY

    def count(self, method: str) -> int:
        return sum(1 for call in self.calls if call.endswith("/" + method))

    def unary_unary(self, method: str, response_deserializer: Callable[[bytes], Any], **_: Any) -> Any:
        async def call(request: Any, **options: Any) -> Any:
            if method == LIST_MODELS:
                self.listed += 1
                await asyncio.sleep(self.list_delay)
                if self.models is None:
                    raise error(grpc.StatusCode.UNAVAILABLE)
                return info_pb2.ListServedModelsResponse(
                    models=[info_pb2.ServedModel(id=name, task="generation") for name in self.models]
                )
            self.calls.append(method)
            self.timeouts.append(options.get("timeout"))
            await self.hold.wait()
            if self.fail_with is not None:
                raise error(self.fail_with)
            name = method.rsplit("/", 1)[1]
            return self.replies[name] if name in self.replies else response_deserializer(b"")

        return call

    def unary_stream(self, method: str, response_deserializer: Callable[[bytes], Any], **_: Any) -> Any:
        replica = self

        class Call:
            def __init__(self) -> None:
                replica.calls.append(method)

            def cancel(self) -> bool:
                return True

            async def _messages(self) -> AsyncIterator[Any]:
                if method == HEALTH_WATCH:
                    while True:
                        yield health_pb2.HealthCheckResponse(status=await replica.health.get())
                if method == WATCH_LOAD:
                    await asyncio.Event().wait()
                if replica.fail_with is not None:
                    raise error(replica.fail_with)
                for number in range(3):
                    await replica.hold.wait()
                    message = response_deserializer(b"")
                    message.index = number
                    yield message

            def __aiter__(self) -> AsyncIterator[Any]:
                return self._messages()

        return lambda request, **__: Call()

    async def close(self, grace: float | None = None) -> None:
        self.closes.append(grace)
        if grace:
            await asyncio.sleep(grace)


class FakeContext:
    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def time_remaining(self) -> float | None:
        return 30.0


CONTEXT = cast(Context, FakeContext())
RoutableT = TypeVar("RoutableT", bound=routing.Routable)


class Recording:
    """A routing policy that records the candidates it was offered (and picks the first)."""

    def __init__(self, offered: list[list[str]]) -> None:
        self.offered = offered

    def choose(self, candidates: Sequence[RoutableT], prefix: Sequence[int]) -> RoutableT:
        self.offered.append([candidate.address for candidate in candidates])
        return candidates[0]

    def served(self, replica: routing.Routable, prefix: Sequence[int]) -> None:
        pass


class Stack:
    def __init__(
        self, generators: str = "g1:1,g2:2", embedders: str = "e1:1,e2:2", policy: Any = None
    ) -> None:
        self.replicas: dict[str, FakeReplica] = {}
        self.generator = Backend(
            "generator", generators, 3, [], False, channel_factory=self._channel, policy_factory=policy
        )
        self.embedder = Backend(
            "embedder", embedders, 3, [], False, channel_factory=self._channel, policy_factory=policy
        )
        self.backends = Backends(self.generator, self.embedder, ResponseCache(0))
        self.catalog = ModelCatalog(self.generator, self.embedder)

    def _channel(self, target: str, options: list[tuple[str, Any]], interceptors: list[Any]) -> Any:
        self.replicas[target] = FakeReplica(target)
        return self.replicas[target]

    def serve(self, **models: list[str]) -> None:
        for address, names in models.items():
            self.replicas[address.replace("_", ":")].models = names

    async def generate_on(self, model: str, count: int = 4) -> list[str]:
        """The replica each of `count` Generate calls for `model` went to."""
        served = []
        for _ in range(count):
            before = {address: fake.count("Generate") for address, fake in self.replicas.items()}
            await within(self.backends.generate(generation_pb2.GenerateRequest(model=model), CONTEXT))
            served += [
                address for address, fake in self.replicas.items() if fake.count("Generate") > before[address]
            ]
        return served

    async def close(self) -> None:
        await self.backends.close()


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    made = Stack()
    yield made
    await made.close()


async def test_before_any_replica_answers_a_request_goes_to_any_replica(stack: Stack) -> None:
    assert set(await stack.generate_on("model-a")) == {"g1:1", "g2:2"}


async def test_each_request_goes_only_to_a_replica_of_its_model(stack: Stack) -> None:
    stack.serve(g1_1=["model-a"], g2_2=["model-b"])
    await stack.generator.refresh_models()
    assert set(await stack.generate_on("model-a")) == {"g1:1"}
    assert set(await stack.generate_on("model-b")) == {"g2:2"}
    # An empty model is the default one: the first model of the first replica that answered.
    assert set(await stack.generate_on("")) == {"g1:1"}


async def test_the_model_list_is_the_union_with_replica_counts(stack: Stack) -> None:
    stack.serve(g1_1=["model-a"], g2_2=["model-a", "model-b"])
    await stack.generator.refresh_models()
    models = await within(stack.catalog.models("generation"))
    assert [(model.id, model.replicas) for model in models] == [("model-a", 2), ("model-b", 1)]
    assert set(await stack.generate_on("model-a")) == {"g1:1", "g2:2"}


async def test_an_unknown_model_is_not_found_naming_the_models_served(stack: Stack) -> None:
    stack.serve(g1_1=["model-a"], g2_2=["model-b"])
    await stack.generator.refresh_models()
    with pytest.raises(GatewayError) as refused:
        await within(stack.catalog.resolve("generation", "model-c"))
    assert refused.value.code == grpc.StatusCode.NOT_FOUND
    assert "model-a" in refused.value.message and "model-b" in refused.value.message
    assert await within(stack.catalog.resolve("generation", "model-b")) == "model-b"


async def test_a_replica_that_starts_serving_is_asked_again_what_it_serves(stack: Stack) -> None:
    stack.serve(g1_1=["model-a"], g2_2=["model-a"])
    await stack.generator.refresh_models()
    stack.generator.watch()
    stack.serve(g2_2=["model-b"])
    stack.replicas["g2:2"].health.put_nowait(health_pb2.HealthCheckResponse.SERVING)
    await eventually(lambda: "model-b" in stack.generator.model_pools)
    assert set(await stack.generate_on("model-a")) == {"g1:1"}
    assert set(await stack.generate_on("model-b")) == {"g2:2"}


async def test_the_policy_chooses_among_the_replicas_of_the_model_only() -> None:
    offered: list[list[str]] = []
    stack = Stack("g1:1,g2:2,g3:3", policy=lambda: Recording(offered))
    try:
        stack.serve(g1_1=["model-a"], g2_2=["model-b"], g3_3=["model-a"])
        await stack.generator.refresh_models()
        await stack.generate_on("model-a", 1)
        assert offered[-1] == ["g1:1", "g3:3"]
    finally:
        await stack.close()


async def test_resource_exhausted_goes_on_to_a_replica_not_tried(stack: Stack) -> None:
    stack.serve(g1_1=["model-a"], g2_2=["model-a"])
    await stack.generator.refresh_models()
    stack.replicas["g1:1"].fail_with = grpc.StatusCode.RESOURCE_EXHAUSTED
    for _ in range(4):
        await within(stack.backends.generate(generation_pb2.GenerateRequest(model="model-a"), CONTEXT))
    messages = [
        message
        async for message in stack.backends.generate_stream(
            generation_pb2.GenerateStreamRequest(model="model-a"), CONTEXT
        )
    ]
    assert len(messages) == 3
    # Both busy: the client gets the refusal, after each replica was tried once.
    stack.replicas["g2:2"].fail_with = grpc.StatusCode.RESOURCE_EXHAUSTED
    before = stack.replicas["g1:1"].count("Generate") + stack.replicas["g2:2"].count("Generate")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await within(stack.backends.generate(generation_pb2.GenerateRequest(model="model-a"), CONTEXT))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stack.replicas["g1:1"].count("Generate") + stack.replicas["g2:2"].count("Generate") == before + 2


async def test_resource_exhausted_with_one_replica_of_the_model_reaches_the_client(stack: Stack) -> None:
    stack.serve(g1_1=["model-a"], g2_2=["model-b"])
    await stack.generator.refresh_models()
    stack.replicas["g1:1"].fail_with = grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await within(stack.backends.generate(generation_pb2.GenerateRequest(model="model-a"), CONTEXT))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stack.replicas["g2:2"].count("Generate") == 0


def replica_of(backend: Backend, address: str) -> Replica:
    return next(replica for replica in backend.pool.replicas if replica.address == address)


async def test_outstanding_counts_the_calls_in_flight_on_a_replica() -> None:
    stack = Stack("g1:1", "e1:1")
    try:
        replica = replica_of(stack.generator, "g1:1")
        fake = stack.replicas["g1:1"]
        fake.hold.clear()
        calls = [
            asyncio.create_task(stack.backends.generate(generation_pb2.GenerateRequest(), CONTEXT))
            for _ in range(3)
        ]
        await eventually(lambda: replica.outstanding == 3)
        fake.hold.set()
        await within(asyncio.gather(*calls))
        assert replica.outstanding == 0
        # A stream the client leaves after its first message is no longer counted.
        stream = stack.backends.generate_stream(generation_pb2.GenerateStreamRequest(), CONTEXT)
        await within(anext(stream))
        assert replica.outstanding == 1
        await stream.aclose()  # type: ignore[attr-defined]
        assert replica.outstanding == 0
        # A failed call too.
        fake.fail_with = grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError):
            await within(stack.backends.generate(generation_pb2.GenerateRequest(), CONTEXT))
        assert replica.outstanding == 0
    finally:
        await stack.close()


async def test_load_reports_are_followed_per_replica_and_stopped_on_close() -> None:
    stack = Stack()
    stack.generator.watch()
    await eventually(lambda: all(fake.calls.count(WATCH_LOAD) == 1 for fake in stack.replicas.values()))
    tasks = list(stack.generator._follows.values())
    await stack.close()
    assert len(tasks) == 2 and all(task.done() for task in tasks)


async def test_cache_status_is_summed_and_listed_per_replica_with_errors(stack: Stack) -> None:
    stack.replicas["e1:1"].replies["GetCacheStatus"] = embedding_pb2.GetCacheStatusResponse(
        strategy="fixed_size",
        max_models=3,
        memory_used_mib=10,
        evictions=1,
        loading=["x"],
        models=[embedding_pb2.CachedModel(name="m1")],
    )
    stack.replicas["e2:2"].replies["GetCacheStatus"] = embedding_pb2.GetCacheStatusResponse(
        strategy="fixed_size",
        max_models=3,
        memory_used_mib=5,
        evictions=2,
        loading=["x"],
        models=[embedding_pb2.CachedModel(name="m2")],
    )
    reply = await within(stack.backends.cache_status(embedding_pb2.GetCacheStatusRequest(), CONTEXT))
    assert (reply.strategy, reply.max_models, reply.memory_used_mib, reply.evictions) == (
        "fixed_size",
        6,
        15,
        3,
    )
    assert [model.name for model in reply.models] == ["m1", "m2"] and list(reply.loading) == ["x"]
    assert [(part.address, part.status.max_models) for part in reply.replicas] == [("e1:1", 3), ("e2:2", 3)]
    stack.replicas["e2:2"].fail_with = grpc.StatusCode.UNAVAILABLE
    reply = await within(stack.backends.cache_status(embedding_pb2.GetCacheStatusRequest(), CONTEXT))
    assert reply.max_models == 3
    assert reply.replicas[1].address == "e2:2" and reply.replicas[1].error.startswith("UNAVAILABLE")
    # No replica answers: the client gets the error.
    stack.replicas["e1:1"].fail_with = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError):
        await within(stack.backends.cache_status(embedding_pb2.GetCacheStatusRequest(), CONTEXT))


async def test_counters_and_clearing_go_to_the_replicas_serving_the_model(stack: Stack) -> None:
    stack.serve(e1_1=["m1"], e2_2=["m2"])
    await stack.embedder.refresh_models()
    for address, requests in (("e1:1", 4), ("e2:2", 7)):
        stack.replicas[address].replies["GetModelCounter"] = embedding_pb2.GetModelCounterResponse(
            model="m1", requests=requests, inputs=requests * 2
        )
    reply = await within(
        stack.backends.model_counter(embedding_pb2.GetModelCounterRequest(model="m1"), CONTEXT)
    )
    assert (reply.requests, [part.address for part in reply.replicas]) == (4, ["e1:1"])
    # A model no replica lists: every replica is asked, and the counters are summed.
    reply = await within(
        stack.backends.model_counter(embedding_pb2.GetModelCounterRequest(model="m9"), CONTEXT)
    )
    assert (reply.requests, reply.inputs, len(reply.replicas)) == (11, 22, 2)
    stack.replicas["e2:2"].replies["ClearCache"] = embedding_pb2.ClearCacheResponse(cleared=["m2"])
    cleared = await within(
        stack.backends.clear_cache(embedding_pb2.ClearCacheRequest(models=["m2"]), CONTEXT)
    )
    assert (list(cleared.cleared), list(cleared.addresses)) == (["m2"], ["e2:2"])
    everything = await within(stack.backends.clear_cache(embedding_pb2.ClearCacheRequest(), CONTEXT))
    assert list(everything.addresses) == ["e1:1", "e2:2"]


async def test_preload_goes_to_the_replicas_listing_the_model_or_to_all(stack: Stack) -> None:
    stack.serve(e1_1=["m1"], e2_2=["m2"])
    await stack.embedder.refresh_models()
    for fake in stack.replicas.values():
        fake.replies["PreloadModels"] = embedding_pb2.PreloadModelsResponse(accepted=["m1"])
    reply = await within(stack.backends.preload(embedding_pb2.PreloadModelsRequest(models=["m1"]), CONTEXT))
    assert (list(reply.accepted), list(reply.addresses)) == (["m1"], ["e1:1"])
    reply = await within(stack.backends.preload(embedding_pb2.PreloadModelsRequest(models=["m3"]), CONTEXT))
    assert (list(reply.accepted), list(reply.addresses)) == (["m1"], ["e1:1", "e2:2"])


async def test_a_dns_name_becomes_one_watched_replica_per_address_keeping_the_name_for_tls() -> None:
    stack = Stack("dns:///localhost:50052", "e1:1")
    try:
        await stack.generator.refresh_models()  # before the name is resolved: its one channel
        assert [replica.address for replica in stack.generator.pool.replicas] == ["dns:///localhost:50052"]
        stack.generator.watch()
        await eventually(lambda: "127.0.0.1:50052" in stack.generator.replicas)
        replica = replica_of(stack.generator, "127.0.0.1:50052")
        assert replica.watched and replica.target == "ipv4:127.0.0.1:50052"
        assert ("grpc.ssl_target_name_override", "localhost") in (replica.options or [])
        assert stack.generator.attempts == 3
        fake = stack.replicas["ipv4:127.0.0.1:50052"]
        fake.models = ["model-a"]
        await stack.generator.refresh_models()
        await within(stack.backends.generate(generation_pb2.GenerateRequest(model="model-a"), CONTEXT))
        assert fake.count("Generate") == 1
        await eventually(lambda: HEALTH_WATCH in fake.calls)
    finally:
        await stack.close()


def issue_for_name(ca: Authority, folder: Path, name: str) -> tls.TlsFiles:
    """A server certificate for the DNS name `name` only (no IP address), signed by `ca`."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    (folder / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return tls.TlsFiles("", str(folder / "server.crt"), str(folder / "server.key"))


async def test_a_resolved_address_is_verified_against_the_name_over_tls(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "pools-ca")
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    port = server.add_secure_port(
        "127.0.0.1:0", tls.server_credentials(issue_for_name(ca, tmp_path, "localhost"))
    )
    await server.start()
    backend = Backend(
        "generator", f"dns:///localhost:{port}", 1, [], False, tls_files=tls.TlsFiles(str(ca.path))
    )
    try:
        await eventually(lambda: f"127.0.0.1:{port}" in backend.replicas)
        replica = replica_of(backend, f"127.0.0.1:{port}")
        reply = await within(
            health_pb2_grpc.HealthStub(replica.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # The same address without the name is refused: the certificate names localhost only.
        async with grpc.aio.secure_channel(
            f"ipv4:127.0.0.1:{port}", tls.channel_credentials(tls.TlsFiles(str(ca.path)))
        ) as bare:
            with pytest.raises(grpc.aio.AioRpcError):
                await within(
                    health_pb2_grpc.HealthStub(bare).Check(health_pb2.HealthCheckRequest(), timeout=5)
                )
    finally:
        await backend.close()
        await server.stop(None)
