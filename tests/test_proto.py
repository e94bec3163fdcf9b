"""The protobuf definitions in api/proto/: fresh generated code, containerd's wire contract,
and Any handling the way containerd 1.6 resolves it."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools
import pytest
from google.protobuf import any_pb2, descriptor_pb2, timestamp_pb2
from grpc_tools import protoc

import api.gen
from api import protogen, typeurl
from api.gen.containerd.cgroups.v1 import metrics_pb2 as cgroups_v1
from api.gen.containerd.events import task_pb2 as events
from api.gen.containerd.services.ttrpc.events.v1 import events_pb2 as ttrpc_events
from api.gen.containerd.task.v2 import shim_pb2
from tools import gotools

GOCODE = Path("/usr/share/gocode/src")
CONTAINERD = "github.com/containerd/containerd"

# Our file -> containerd's original (relative to GOCODE).
ORIGINALS = {
    "containerd/types/mount.proto": f"{CONTAINERD}/api/types/mount.proto",
    "containerd/types/task/task.proto": f"{CONTAINERD}/api/types/task/task.proto",
    "containerd/types/metrics.proto": f"{CONTAINERD}/api/types/metrics.proto",
    "containerd/task/v2/shim.proto": f"{CONTAINERD}/runtime/v2/task/shim.proto",
    "containerd/events/task.proto": f"{CONTAINERD}/api/events/task.proto",
    "containerd/services/ttrpc/events/v1/events.proto": (
        f"{CONTAINERD}/api/services/ttrpc/events/v1/events.proto"
    ),
    "containerd/services/events/v1/events.proto": f"{CONTAINERD}/api/services/events/v1/events.proto",
    "containerd/cgroups/v1/metrics.proto": "github.com/containerd/cgroups/stats/v1/metrics.proto",
    "containerd/cgroups/v2/metrics.proto": "github.com/containerd/cgroups/v2/stats/metrics.proto",
    "containerd/runtimeoptions/v1/api.proto": f"{CONTAINERD}/pkg/runtimeoptions/v1/api.proto",
}
# Protos that only containerd 2.x has: the originals are in the Go module cache `make tools`
# fills, from the containerd API module the pinned containerd 2.x requires.
GO_MODULES = Path(gotools.CACHE_ROOT) / "gomod"
CONTAINERD_API_2X = "github.com/containerd/containerd/api@v1.12.0"
ORIGINALS_2X = {
    "containerd/runtime/bootstrap/v1/bootstrap.proto": (
        f"{CONTAINERD_API_2X}/runtime/bootstrap/v1/bootstrap.proto"
    ),
}


def test_generated_modules_are_fresh(tmp_path):
    fresh = tmp_path / "gen"
    protogen.generate(fresh)
    stale = protogen.differences(fresh, protogen.GEN_DIR)
    assert stale == [], f"api/gen is stale, run `make proto`: {stale}"


def test_every_proto_file_has_its_original_or_is_ours():
    ours_only = {"google/rpc/status.proto", "ttrpc/ttrpc.proto", "zviz/events/v1/denial.proto"}
    assert set(protogen.proto_files()) == set(ORIGINALS) | set(ORIGINALS_2X) | ours_only


def _compile(files: list[str], includes: list[Path]) -> descriptor_pb2.FileDescriptorSet:
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="zviz-proto-") as scratch:
        out = Path(scratch) / "set.pb"
        args = ["protoc", f"-I{well_known}", *(f"-I{i}" for i in includes)]
        args += [f"--descriptor_set_out={out}", *files]
        assert protoc.main(args) == 0, f"protoc failed on {files}"
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _contract(file: descriptor_pb2.FileDescriptorProto) -> dict:
    """Everything about a file that travels on the wire or names a type."""

    def message(m, prefix):
        name = f"{prefix}.{m.name}"
        out = {
            name: sorted(
                (f.name, f.number, f.type, f.label, f.type_name, f.json_name) for f in m.field
            )
        }
        for nested in m.nested_type:
            out.update(message(nested, name))
        for enum in m.enum_type:
            out[f"{name}.{enum.name}"] = sorted((v.name, v.number) for v in enum.value)
        return out

    contract: dict = {"package": file.package}
    for m in file.message_type:
        contract.update(message(m, file.package))
    for enum in file.enum_type:
        contract[f"{file.package}.{enum.name}"] = sorted((v.name, v.number) for v in enum.value)
    for service in file.service:
        contract[f"service {file.package}.{service.name}"] = [
            (m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming)
            for m in service.method
        ]
    return contract


@pytest.mark.skipif(
    not (GOCODE / CONTAINERD).is_dir(),
    reason="containerd's .proto sources (golang-github-containerd-containerd-dev) not installed",
)
@pytest.mark.parametrize("ours", sorted(ORIGINALS))
def test_wire_contract_matches_containerd(ours):
    """Package, messages, field names/numbers/types/labels, enums and methods are identical
    to containerd's own .proto (compiled here with its gogoproto imports)."""
    original = ORIGINALS[ours]
    gogo = GOCODE / "github.com/gogo/protobuf"
    # runtimeoptions imports gogo.proto by its full path; the others by "gogoproto/...".
    includes = [GOCODE, gogo / "protobuf"]
    if "runtimeoptions" not in original:
        includes.insert(1, gogo)
    theirs = _compile([original], includes).file[0]
    mine = _compile([ours], [protogen.PROTO_DIR]).file[0]
    assert _contract(mine) == _contract(theirs)


@pytest.mark.skipif(
    not (GO_MODULES / CONTAINERD_API_2X).is_dir(),
    reason=f"containerd 2.x's API module is not in {GO_MODULES}: run `make tools`",
)
@pytest.mark.parametrize("ours", sorted(ORIGINALS_2X))
def test_wire_contract_matches_containerd_2x(ours):
    theirs = _compile([ORIGINALS_2X[ours]], [GO_MODULES]).file[0]
    mine = _compile([ours], [protogen.PROTO_DIR]).file[0]
    assert _contract(mine) == _contract(theirs)


def test_service_method_names_are_containerds():
    task = shim_pb2.DESCRIPTOR.services_by_name["Task"]
    assert task.full_name == "containerd.task.v2.Task"
    assert [m.name for m in task.methods] == [
        "State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint",
        "Kill", "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect",
        "Shutdown",
    ]  # fmt: skip
    forward = ttrpc_events.DESCRIPTOR.services_by_name["Events"].methods_by_name["Forward"]
    assert forward.full_name == "containerd.services.events.ttrpc.v1.Events.Forward"


def test_every_generated_module_imports_under_api_gen():
    names = [
        m.name
        for m in pkgutil.walk_packages(api.gen.__path__, "api.gen.")
        if m.name.endswith(("_pb2", "_ttrpc"))
    ]
    assert len(names) >= 12
    for name in names:
        module = importlib.import_module(name)
        if name.endswith("_pb2"):
            for attr in vars(module).values():
                if isinstance(attr, type) and hasattr(attr, "DESCRIPTOR"):
                    assert attr.__module__ == name


def test_importing_ttrpc_stays_cheap():
    """The shim's start path imports api.ttrpc: it must not pull in grpclib or the
    containerd message modules."""
    code = (
        "import sys, api.ttrpc\n"
        "heavy = sorted(m for m in sys.modules if m.startswith(('grpclib', 'h2', 'api.gen.containerd')))\n"
        "print(heavy)\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[]"


def test_pack_writes_the_bare_name_containerd_16_resolves():
    event = events.TaskExit(
        container_id="c1", id="c1", pid=42, exit_status=137, exited_at=timestamp_pb2.Timestamp()
    )
    packed = typeurl.pack(event)
    assert packed.type_url == "containerd.events.TaskExit"
    assert typeurl.unpack(packed) == event


@pytest.mark.parametrize(
    "prefix", ["", "type.googleapis.com/", "types.containerd.io/", "example.com/x/"]
)
def test_unpack_accepts_prefixed_type_urls(prefix):
    metrics = cgroups_v1.Metrics(pids=cgroups_v1.PidsStat(current=3, limit=10))
    packed = any_pb2.Any(
        type_url=prefix + "io.containerd.cgroups.v1.Metrics", value=metrics.SerializeToString()
    )
    assert typeurl.unpack(packed) == metrics


def test_unpack_finds_types_of_modules_not_imported_yet():
    code = (
        "from google.protobuf import any_pb2\n"
        "from api import typeurl\n"
        "m = typeurl.unpack(any_pb2.Any(type_url='io.containerd.cgroups.v2.Metrics', value=b''))\n"
        "print(type(m).__module__)\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "api.gen.containerd.cgroups.v2.metrics_pb2"


def test_unpack_names_what_is_wrong():
    with pytest.raises(typeurl.UnknownTypeError, match="no.such.Message"):
        typeurl.unpack(any_pb2.Any(type_url="no.such.Message"))
    with pytest.raises(typeurl.UnknownTypeError, match="no type_url"):
        typeurl.unpack(any_pb2.Any())


def test_json_anys_as_containerd_sends_them():
    process = {"args": ["sh", "-c", "true"], "cwd": "/"}
    packed = typeurl.pack_json(typeurl.OCI_PROCESS_URL, process)
    assert packed.type_url == "types.containerd.io/opencontainers/runtime-spec/1/Process"
    assert typeurl.unpack_json(packed, typeurl.OCI_PROCESS_URL) == process
    with pytest.raises(typeurl.UnknownTypeError, match="expected"):
        typeurl.unpack_json(packed, typeurl.OCI_LINUX_RESOURCES_URL)
    with pytest.raises(ValueError, match="not JSON"):
        typeurl.unpack_json(any_pb2.Any(type_url="x", value=b"\xff{"))


def test_envelope_round_trips_with_a_packed_event():
    envelope = ttrpc_events.Envelope(
        timestamp=timestamp_pb2.Timestamp(seconds=1, nanos=2),
        namespace="zviz",
        topic="/tasks/exit",
        event=typeurl.pack(events.TaskExit(container_id="c")),
    )
    decoded = ttrpc_events.ForwardRequest.FromString(
        ttrpc_events.ForwardRequest(envelope=envelope).SerializeToString()
    ).envelope
    assert decoded == envelope
    assert typeurl.unpack(decoded.event).container_id == "c"
