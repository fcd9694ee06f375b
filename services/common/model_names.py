"""The names a served model answers to, shared by the gateway (routing a request's `model`) and
the predictions service (resolving a prediction's `model`) so that both accept the same names."""

from __future__ import annotations

import os

from inference.v1 import info_pb2


def aliases(model: info_pb2.ServedModel) -> set[str]:
    """Names a client may use for a model: its id, its source, and the source's last part."""
    names = {model.id}
    if model.source:
        names.add(model.source)
        names.add(os.path.basename(model.source.rstrip("/")))
    return {name for name in names if name}
