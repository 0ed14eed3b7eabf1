"""The kubelet's pod-resources API: which devices the device plugin gave each container.

`List` on the kubelet's unix socket (`/var/lib/kubelet/pod-resources/kubelet.sock`, gRPC
service `v1.PodResourcesLister`, root only) answers a `ListPodResourcesResponse`. The only
module that imports grpc and protobuf, lazily: both come with SkyPilot's Kubernetes
support, and cost an import only when the socket is there to ask.

The messages are declared here, from k8s.io/kubelet/pkg/apis/podresources/v1/api.proto,
with just the fields deskgpu reads (protobuf skips the others: cpu_ids, memory,
dynamic_resources, a pod's own cpu_ids). Field numbers are the proto's.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVICE = "v1.PodResourcesLister"
LIST_METHOD = f"/{SERVICE}/List"

# (message, [(field, number, type, repeated, message type)]) as in api.proto (v1).
_STRING, _INT64, _MESSAGE = 9, 3, 11  # FieldDescriptorProto.Type
_MESSAGES: list[tuple[str, list[tuple[str, int, int, bool, str | None]]]] = [
    ("ListPodResourcesRequest", []),
    ("ListPodResourcesResponse", [("pod_resources", 1, _MESSAGE, True, "PodResources")]),
    (
        "PodResources",
        [
            ("name", 1, _STRING, False, None),
            ("namespace", 2, _STRING, False, None),
            ("containers", 3, _MESSAGE, True, "ContainerResources"),
        ],
    ),
    (
        "ContainerResources",
        [("name", 1, _STRING, False, None), ("devices", 2, _MESSAGE, True, "ContainerDevices")],
    ),
    (
        "ContainerDevices",
        [
            ("resource_name", 1, _STRING, False, None),
            ("device_ids", 2, _STRING, True, None),
            ("topology", 3, _MESSAGE, False, "TopologyInfo"),
        ],
    ),
    ("TopologyInfo", [("nodes", 1, _MESSAGE, True, "NUMANode")]),
    ("NUMANode", [("ID", 1, _INT64, False, None)]),
]


class PodResourcesError(Exception):
    """The socket could not be asked; the message says why, in one line."""


@dataclass(frozen=True)
class ContainerDevices:
    pod: str
    namespace: str
    container: str
    resource_name: str
    device_ids: tuple[str, ...]


@functools.cache
def messages() -> dict[str, Any]:
    """The message classes, built from the declaration above in a private descriptor pool."""
    return build_messages("deskgpu/podresources/v1/api.proto", _MESSAGES)


def build_messages(filename: str, declarations: Any) -> dict[str, Any]:
    """Message classes for `(name, [(field, number, type, repeated, message type)])` rows, in
    package `v1` of a descriptor pool of their own (no generated code, no global registry)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    proto = descriptor_pb2.FileDescriptorProto(name=filename, package="v1", syntax="proto3")
    for name, declared in declarations:
        message = proto.message_type.add(name=name)
        for field, number, kind, repeated, type_name in declared:
            message.field.add(
                name=field,
                number=number,
                type=kind,
                label=3 if repeated else 1,  # LABEL_REPEATED / LABEL_OPTIONAL
                type_name=f".v1.{type_name}" if type_name else None,
                json_name="".join(
                    part if i == 0 else part.capitalize() for i, part in enumerate(field.split("_"))
                ),
            )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"v1.{name}"))
        for name, _ in declarations
    }


def parse_list_response(data: bytes) -> list[ContainerDevices]:
    """A serialized `ListPodResourcesResponse` -> one entry per container's device group."""
    try:
        response = messages()["ListPodResourcesResponse"].FromString(data)
    except Exception as exc:  # protobuf's DecodeError; any other is as much "not a reply"
        raise PodResourcesError(f"not a ListPodResourcesResponse: {exc}") from None
    return from_message(response)


def from_message(response: Any) -> list[ContainerDevices]:
    out = []
    for pod in response.pod_resources:
        for container in pod.containers:
            if not container.devices:  # a container with no devices is still listed
                out.append(ContainerDevices(pod.name, pod.namespace, container.name, "", ()))
            for devices in container.devices:
                out.append(
                    ContainerDevices(
                        pod.name,
                        pod.namespace,
                        container.name,
                        devices.resource_name,
                        tuple(devices.device_ids),
                    )
                )
    return out


def list_devices(socket: Path, timeout_s: float = 3.0) -> list[ContainerDevices]:
    """Ask the kubelet's `List` over `socket`; every failure is a `PodResourcesError`."""
    try:
        socket.stat()
    except FileNotFoundError:
        raise PodResourcesError(f"no pod-resources socket at {socket}") from None
    except OSError as exc:
        raise PodResourcesError(f"{socket}: {exc.strerror or exc}") from None
    if not os.access(socket, os.R_OK | os.W_OK):
        raise PodResourcesError(f"{socket} is not usable by this user (needs root)")
    import grpc

    classes = messages()
    try:
        with grpc.insecure_channel(f"unix://{socket.resolve()}") as channel:
            call = channel.unary_unary(
                LIST_METHOD,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=classes["ListPodResourcesResponse"].FromString,
            )
            response = call(classes["ListPodResourcesRequest"](), timeout=timeout_s)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        name = getattr(code, "name", "failed")
        raise PodResourcesError(f"{socket}: List {name}: {(detail or '')[:160]}") from None
    return from_message(response)
