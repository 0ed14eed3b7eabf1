"""A real gRPC server speaking the kubelet's pod-resources API on a unix socket in tmp.

It encodes with the full v1 message shapes (cpu_ids, memory and topology included, as a
kubelet sends them), declared here apart from `deskgpu.podresources`, which reads a subset:
so the client is tested against bytes it did not write itself (only the descriptor
builder, `podresources.build_messages`, is shared).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

from deskgpu import podresources

_S, _I64, _U64, _M = 9, 3, 4, 11
_FULL = [
    ("ListPodResourcesRequest", []),
    ("ListPodResourcesResponse", [("pod_resources", 1, _M, True, "PodResources")]),
    (
        "PodResources",
        [
            ("name", 1, _S, False, None),
            ("namespace", 2, _S, False, None),
            ("containers", 3, _M, True, "ContainerResources"),
        ],
    ),
    (
        "ContainerResources",
        [
            ("name", 1, _S, False, None),
            ("devices", 2, _M, True, "ContainerDevices"),
            ("cpu_ids", 3, _I64, True, None),
            ("memory", 4, _M, True, "ContainerMemory"),
        ],
    ),
    (
        "ContainerMemory",
        [
            ("memory_type", 1, _S, False, None),
            ("size", 2, _U64, False, None),
            ("topology", 3, _M, False, "TopologyInfo"),
        ],
    ),
    (
        "ContainerDevices",
        [
            ("resource_name", 1, _S, False, None),
            ("device_ids", 2, _S, True, None),
            ("topology", 3, _M, False, "TopologyInfo"),
        ],
    ),
    ("TopologyInfo", [("nodes", 1, _M, True, "NUMANode")]),
    ("NUMANode", [("ID", 1, _I64, False, None)]),
]


def full_messages() -> dict[str, Any]:
    """The kubelet's full shapes (declared here), built by the same descriptor builder."""
    return podresources.build_messages("tests/kubelet/podresources/v1/api.proto", _FULL)


@contextlib.contextmanager
def serving(
    socket: Path, response: dict[str, Any] | None = None, *, fail: str | None = None
) -> Iterator[list[str]]:
    """Serve `List` on `socket` (a protobuf-JSON ListPodResourcesResponse); `fail` names a
    grpc.StatusCode to abort every call with. Yields the list of calls received."""
    import grpc
    from google.protobuf import json_format

    classes = full_messages()
    calls: list[str] = []

    def list_pods(_request: Any, context: Any) -> Any:
        calls.append("List")
        if fail is not None:
            context.abort(getattr(grpc.StatusCode, fail), f"{fail.lower()} (test server)")
        return json_format.ParseDict(response or {}, classes["ListPodResourcesResponse"]())

    handler = grpc.method_handlers_generic_handler(
        podresources.SERVICE,
        {
            "List": grpc.unary_unary_rpc_method_handler(
                list_pods,
                request_deserializer=classes["ListPodResourcesRequest"].FromString,
                response_serializer=lambda m: m.SerializeToString(),
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    socket.parent.mkdir(parents=True, exist_ok=True)
    server.add_insecure_port(f"unix://{socket}")
    server.start()
    try:
        yield calls
    finally:
        server.stop(0).wait()
