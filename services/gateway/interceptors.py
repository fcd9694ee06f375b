"""The gateway's error mapping (gateway and backend errors become a gRPC status with details),
and the names its policy wrappers share (services/common/interceptors.py applies them)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
import grpc.aio

# Re-exported: the gateway's policy modules import these from here.
from services.common.interceptors import BehaviorWrapper as BehaviorWrapper
from services.common.interceptors import Context as Context
from services.common.interceptors import StreamBehavior as StreamBehavior
from services.common.interceptors import UnaryBehavior as UnaryBehavior
from services.gateway.errors import GatewayError, abort_with, from_backend

log = logging.getLogger(__name__)

# Services whose calls carry policy; health checks and reflection pass untouched.
POLICY_PREFIX = "/inference.v1."


def carries_policy(method: str) -> bool:
    return method.startswith(POLICY_PREFIX)


def as_gateway_error(error: BaseException) -> GatewayError | None:
    if isinstance(error, GatewayError):
        return error
    if isinstance(error, grpc.aio.AioRpcError):
        return from_backend(error)
    return None


class ErrorMapping(BehaviorWrapper):
    """GatewayError and backend errors become the client's status (with their details); any other
    exception is logged and reported as INTERNAL without leaking its text."""

    def unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        async def mapped(request: Any, context: Context) -> Any:
            try:
                return await behavior(request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as error:
                await self._abort(method, context, error)

        return mapped

    def stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        async def mapped(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async for item in behavior(request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as error:
                await self._abort(method, context, error)

        return mapped

    @staticmethod
    async def _abort(method: str, context: Context, error: Exception) -> NoReturn:
        mapped = as_gateway_error(error)
        if mapped is None:
            log.exception("unexpected failure in %s", method)
            mapped = GatewayError(grpc.StatusCode.INTERNAL, f"internal error in {method}")
        await abort_with(context, mapped)
