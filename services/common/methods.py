"""The RPCs of the project's services, read from their protobuf descriptors."""

from __future__ import annotations

from google.protobuf.descriptor import FileDescriptor


def unary_methods(*files: FileDescriptor) -> dict[str, tuple[str, ...]]:
    """Full service name to the names of its methods that answer with one message."""
    return {
        service.full_name: tuple(m.name for m in service.methods if not m.server_streaming)
        for file in files
        for service in file.services_by_name.values()
    }
