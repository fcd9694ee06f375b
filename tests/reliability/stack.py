"""One whole stack (generator, embedder, gateway, Envoy) on loopback for a reliability module,
each tier on a fixed port so that it can be stopped and started again where the others expect it,
and the async REST helpers the cases share (a stream read to its end, a unary chat)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.fixtures_gateway import descriptor_for_envoy, render_envoy, run_envoy, write_key_file
from tests.stack import ServiceProcess, free_port

CHAT = "/v1/chat/completions"


@dataclass
class Tier:
    """One service process on a fixed gRPC port, restartable there with the same arguments."""

    name: str
    module: str
    port: int
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    process: ServiceProcess | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0) -> Tier:
        process = ServiceProcess.python_module(
            self.name,
            self.module,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--metrics-port",
            "0",
            *self.args,
            env={"HF_HUB_OFFLINE": "1", **self.env},
        ).start()
        self.process = process
        try:
            process.wait_until_serving(self.address, timeout=timeout)
        except BaseException:
            process.stop(grace=5)
            raise
        return self

    def stop(self, grace: float = 30.0) -> int | None:
        return self.process.stop(grace) if self.process is not None else None


@dataclass
class Stack:
    generator: Tier
    embedder: Tier
    gateway: Tier
    envoy: ServiceProcess
    url: str
    keys: dict[str, str]
    model: str = ""
    embedding_model: str = ""

    def headers(self, name: str = "user") -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[name]}"}

    def tiers(self) -> list[Tier]:
        return [self.gateway, self.embedder, self.generator]

    def stop(self) -> None:
        self.envoy.stop(grace=5)
        for tier in self.tiers():
            tier.stop(grace=10)


def start_stack(
    workdir: Path,
    generator_args: Sequence[str] = (),
    embedder_args: Sequence[str] = (),
    gateway_args: Sequence[str] = (),
) -> Stack:
    """Start every tier on free fixed ports (the gateway with the test keys) and Envoy before it;
    whatever started is stopped again if a later tier fails to come up."""
    keys_file = workdir / "keys.json"
    keys = write_key_file(keys_file)
    generator = Tier("generator", "services.generator", free_port(), list(generator_args))
    embedder = Tier("embedder", "services.embedder", free_port(), list(embedder_args))
    gateway = Tier(
        "gateway",
        "services.gateway",
        free_port(),
        [
            "--generator-addresses",
            generator.address,
            "--embedder-addresses",
            embedder.address,
            "--api-keys-file",
            str(keys_file),
            *gateway_args,
        ],
    )
    started: list[Tier] = []
    try:
        for tier in (generator, embedder, gateway):
            tier.start()
            started.append(tier)
        envoy, url = start_envoy_at(gateway.address, workdir)
    except BaseException:
        for tier in started:
            tier.stop(grace=5)
        raise
    stack = Stack(generator, embedder, gateway, envoy, url, keys)
    stack.model = generation_model(stack)
    stack.embedding_model = generation_model(stack, task="embedding")
    return stack


def start_envoy_at(gateway_address: str, workdir: Path) -> tuple[ServiceProcess, str]:
    """Envoy from envoy/envoy.yaml on free ports in front of `gateway_address`, once it answers
    /healthz (which it does whether or not the gateway is up)."""
    listen_port, admin_port = free_port(), free_port()
    config = workdir / "envoy.yaml"
    config.write_text(render_envoy(listen_port, admin_port, gateway_address, descriptor_for_envoy()))
    process, url = run_envoy(config, "envoy", listen_port)
    return process, url


def generation_model(stack: Stack, task: str = "generation") -> str:
    """The id the stack serves its `task` model under, as GET /models lists it."""
    request = urllib.request.Request(f"{stack.url}/models", headers=stack.headers())
    with urllib.request.urlopen(request, timeout=30) as reply:
        served = json.load(reply)["models"]
    return str(next(model["id"] for model in served if model["task"] == task))


def chat_body(stack: Stack, stream: bool, max_tokens: int = 8, text: str = "Say hello.") -> dict[str, Any]:
    return {
        "model": stack.model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


@dataclass
class Outcome:
    """How one REST call ended: its status, whether a 200 was complete, and what a refusal
    carried (Retry-After, a JSON error body)."""

    status: int
    complete: bool = False
    retry_after: str | None = None
    json_error: bool = False
    seconds: float = 0.0
    detail: str = ""

    @property
    def refusal_ok(self) -> bool:
        return self.retry_after is not None and self.json_error


def _refusal(status: int, headers: httpx.Headers, body: bytes, started: float) -> Outcome:
    try:
        parsed = json.loads(body)
        json_error = isinstance(parsed, dict) and "error" in parsed
    except ValueError:
        json_error = False
    return Outcome(
        status,
        retry_after=headers.get("retry-after"),
        json_error=json_error,
        seconds=time.monotonic() - started,
        detail=body[:300].decode(errors="replace"),
    )


async def stream_chat(
    client: httpx.AsyncClient,
    stack: Stack,
    max_tokens: int = 8,
    text: str = "Say hello.",
    on_first_event: Callable[[], None] | None = None,
) -> Outcome:
    """One streamed chat; complete when it ends with `data: [DONE]` after a chunk that carries a
    finish_reason and no in-band error. `on_first_event` is called when its first event arrives."""
    started = time.monotonic()
    try:
        async with client.stream(
            "POST", CHAT, json=chat_body(stack, True, max_tokens, text), headers=stack.headers()
        ) as reply:
            if reply.status_code != 200:
                return _refusal(reply.status_code, reply.headers, await reply.aread(), started)
            finish = None
            done = False
            error = ""
            async for line in reply.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if on_first_event is not None:
                    on_first_event()
                    on_first_event = None
                if data == "[DONE]":
                    done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    error = json.dumps(event["error"])[:300]
                for choice in event.get("choices", ()):
                    finish = choice.get("finish_reason") or finish
            return Outcome(
                200,
                complete=done and finish is not None and not error,
                seconds=time.monotonic() - started,
                detail=error or f"done={done} finish={finish}",
            )
    except httpx.HTTPError as failure:
        return Outcome(0, seconds=time.monotonic() - started, detail=f"{type(failure).__name__}: {failure}")


async def unary_chat(
    client: httpx.AsyncClient, stack: Stack, max_tokens: int = 8, text: str = "Say hello."
) -> Outcome:
    """One unary chat; complete when the 200 carries a choice with a message."""
    started = time.monotonic()
    try:
        reply = await client.post(
            CHAT, json=chat_body(stack, False, max_tokens, text), headers=stack.headers()
        )
    except httpx.HTTPError as failure:
        return Outcome(0, seconds=time.monotonic() - started, detail=f"{type(failure).__name__}: {failure}")
    if reply.status_code != 200:
        return _refusal(reply.status_code, reply.headers, reply.content, started)
    choices = reply.json().get("choices") or []
    complete = bool(choices) and choices[0].get("message") is not None
    return Outcome(200, complete=complete, seconds=time.monotonic() - started, detail=reply.text[:300])


def client_for(stack: Stack, connections: int = 700, timeout: float = 120.0) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=stack.url, limits=limits, timeout=timeout)


async def embed(client: httpx.AsyncClient, stack: Stack, inputs: int = 8) -> Outcome:
    """One embeddings call of `inputs` texts; complete when every vector came back."""
    started = time.monotonic()
    body = {"model": stack.embedding_model, "input": [f"sentence number {i}" for i in range(inputs)]}
    try:
        reply = await client.post("/v1/embeddings", json=body, headers=stack.headers())
    except httpx.HTTPError as failure:
        return Outcome(0, seconds=time.monotonic() - started, detail=f"{type(failure).__name__}: {failure}")
    if reply.status_code != 200:
        return _refusal(reply.status_code, reply.headers, reply.content, started)
    complete = len(reply.json().get("data") or []) == inputs
    return Outcome(200, complete=complete, seconds=time.monotonic() - started, detail=reply.text[:300])
