"""The client: one gRPC channel to nt's coordinator and the verbs of
`ntctl` over it."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, TypeVar, Union

import grpc

from ntpy._proto.nt.v1 import runs_pb2, runs_pb2_grpc, spec_pb2

from .config import Settings, resolve

Run = runs_pb2.Run
RunEvent = runs_pb2.RunEvent
RunReport = runs_pb2.RunReport
RunSpec = spec_pb2.RunSpec
RunState = runs_pb2.RunState

FINAL_STATES = (runs_pb2.RUN_STATE_SUCCEEDED, runs_pb2.RUN_STATE_FAILED, runs_pb2.RUN_STATE_CANCELLED)
# What a dropped connection or a restarting coordinator looks like.
TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED)
CHUNK_BYTES = 1 << 20
T = TypeVar("T")


class NtError(Exception):
    """A call the coordinator refused or could not serve: `code` is the gRPC
    status code (`grpc.StatusCode.UNAUTHENTICATED`, ...), `code_name` its
    name (`"UNAUTHENTICATED"`) and `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str, call: str = ""):
        self.code = code
        self.code_name = code.name
        self.details = details
        self.call = call
        where = f"{call}: " if call else ""
        super().__init__(f"{where}{code.name}: {details}{_hint(code, details)}")


def _hint(code: grpc.StatusCode, details: str) -> str:
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return " (check the token: connect(token=...), NT_TOKEN or the config file)"
    if code == grpc.StatusCode.UNAVAILABLE and any(
        w in details.lower() for w in ("connect", "connection", "dns", "unreachable")
    ):
        return " (is the coordinator up? check the endpoint)"
    return ""


def state_name(state: int) -> str:
    """`RUN_STATE_SUCCEEDED` -> `succeeded`."""
    return RunState.Name(state).removeprefix("RUN_STATE_").lower()


@dataclass(frozen=True)
class Upload:
    """A checkpoint stored by the coordinator: `key` is what a run spec names."""

    key: str
    size: int
    sha256: str
    dtype: str
    tensors: int


class Client:
    """A connection to nt's coordinator. Every method raises [`NtError`]
    when the coordinator refuses the call; use as a context manager or call
    `close()`."""

    def __init__(self, settings: Settings, channel: grpc.Channel):
        self.settings = settings
        self._channel = channel
        self._runs = runs_pb2_grpc.RunServiceStub(channel)
        self._metadata = (("authorization", f"Bearer {settings.token}"),) if settings.token else ()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, name: str, method: Callable[..., T], request: Any, **kw: Any) -> T:
        try:
            return method(request, metadata=self._metadata, **kw)
        except grpc.RpcError as e:
            raise NtError(e.code(), e.details() or "", name) from None

    # ------------------------------------------------------------ runs

    def submit(
        self,
        spec: Union[RunSpec, Mapping[str, Any], str, os.PathLike],
        request_id: str = "",
        upload: bool = True,
    ) -> Run:
        """Submits a run and returns it. `spec` is a run spec as `ntctl run`
        reads it (a dict, YAML or JSON text, or the path of such a file) or
        an `nt.v1.RunSpec` message. Member checkpoints that are local files
        (relative to the working directory, as `ntctl submit` reads them)
        are uploaded first, unless
        `upload` is false. With a `request_id` used before, the run it
        created is returned instead of a new one, so retrying is safe."""
        if isinstance(spec, RunSpec):
            request = runs_pb2.SubmitRunRequest(spec=spec, request_id=request_id)
        else:
            document, folder = _spec_document(spec)
            _inline_architecture(document, folder)
            if upload:
                self._upload_local_members(document)
            import yaml

            request = runs_pb2.SubmitRunRequest(spec_file=yaml.safe_dump(document), request_id=request_id)
        return self._call("SubmitRun", self._runs.SubmitRun, request).run

    def get(self, run_id: str) -> Run:
        """One run, with its tasks and report."""
        return self._call("GetRun", self._runs.GetRun, runs_pb2.GetRunRequest(run_id=run_id))

    def list(self, state: Optional[Union[int, str]] = None, page_size: int = 50) -> Iterator[Run]:
        """Runs, newest first, fetched a page at a time; `state` filters
        (`"succeeded"`, `"RUN_STATE_FAILED"` or the enum's number)."""
        token = ""
        while True:
            page = self._call(
                "ListRuns",
                self._runs.ListRuns,
                runs_pb2.ListRunsRequest(page_size=page_size, page_token=token, state=_state(state)),
            )
            yield from page.runs
            token = page.next_page_token
            if not token:
                return

    def cancel(self, run_id: str, reason: str = "") -> Run:
        """Cancels a run; its tasks are stopped on their workers."""
        return self._call("CancelRun", self._runs.CancelRun, runs_pb2.CancelRunRequest(run_id=run_id, reason=reason))

    def report(self, run_id: str) -> RunReport:
        """The run's report (complete once it succeeded)."""
        return self.get(run_id).report

    def watch(self, run_id: str, after_sequence: int = 0, retries: int = 120) -> Iterator[RunEvent]:
        """The run's events in order, each once, until it ends. A dropped
        connection or a restarted coordinator is survived: the watch
        resumes after the last event seen (up to `retries` failures in a
        row, half a second apart)."""
        after, failures = after_sequence, 0
        while True:
            try:
                stream = self._runs.WatchRun(
                    runs_pb2.WatchRunRequest(run_id=run_id, after_sequence=after), metadata=self._metadata
                )
                for event in stream:
                    failures = 0
                    if event.sequence <= after:
                        continue
                    after = event.sequence
                    yield event
            except grpc.RpcError as e:
                # A watcher that fell behind starts again from what it saw.
                if e.code() not in TRANSIENT + (grpc.StatusCode.DATA_LOSS,) or failures >= retries:
                    raise NtError(e.code(), e.details() or "", "WatchRun") from None
                failures += 1
                time.sleep(0.5)
            # The stream ended: done if the run is final, else watch again.
            try:
                if self.get(run_id).state in FINAL_STATES:
                    return
            except NtError as e:
                if e.code not in TRANSIENT or failures >= retries:
                    raise
                failures += 1
                time.sleep(0.5)

    def wait(self, run_id: str, on_event: Optional[Callable[[RunEvent], None]] = None) -> Run:
        """Follows the run to its end (calling `on_event` for each event)
        and returns the final run."""
        for event in self.watch(run_id):
            if on_event is not None:
                on_event(event)
        return self.get(run_id)

    # ------------------------------------------------------------ checkpoints

    def upload(self, path: Union[str, os.PathLike], arch: Union[None, str, Mapping[str, Any]] = None) -> Upload:
        """Uploads a safetensors checkpoint through the coordinator (no
        store credentials needed) and returns where it was stored: name
        `Upload.key` in a run spec's `members.checkpoints`. The coordinator
        checks the file as a submission would (header, sizes, dtypes, and
        names and shapes against `arch`: a preset name, an nt.arch/v1 spec
        as a dict or JSON text, else the one the file records) before it
        stores anything; the key is content-addressed, so uploading the same
        bytes twice gives the same key."""
        path = Path(path)
        size = path.stat().st_size
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(CHUNK_BYTES), b""):
                digest.update(block)
        header = runs_pb2.UploadHeader(file_name=path.name, size=size, sha256=digest.hexdigest())
        if isinstance(arch, Mapping):
            header.architecture.spec_json = json.dumps(arch)
        elif isinstance(arch, str) and arch.lstrip().startswith("{"):
            header.architecture.spec_json = arch
        elif isinstance(arch, str):
            header.architecture.preset = arch

        def messages() -> Iterator[runs_pb2.UploadCheckpointRequest]:
            yield runs_pb2.UploadCheckpointRequest(header=header)
            with path.open("rb") as f:
                for block in iter(lambda: f.read(CHUNK_BYTES), b""):
                    yield runs_pb2.UploadCheckpointRequest(data=block)

        reply = self._call("UploadCheckpoint", self._runs.UploadCheckpoint, messages())
        return Upload(reply.key, reply.size, reply.sha256, reply.dtype, reply.tensors)

    def download(self, run_id: str, model: str = "", dest: Union[str, os.PathLike] = ".") -> Path:
        """Downloads one of the run's objects into the folder `dest` and
        returns its path. `model`: `""` (the first fusion method's model
        after fine-tuning), a method (`"nt"`: its fine-tuned model),
        `"fused/<method>"`, `"fine-tuned/<method>"`, `"member/<i>"`,
        `"baseline"` or `"report"` (report.json). The bytes go to a
        temporary file, are checked against the size and SHA-256 the
        coordinator sends, and only then renamed into place."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        request = runs_pb2.DownloadCheckpointRequest(run_id=run_id, model=model)
        info, out, written, digest, sent = None, None, 0, hashlib.sha256(), None

        def fail(message: str) -> NtError:
            return NtError(grpc.StatusCode.DATA_LOSS, message, "DownloadCheckpoint")

        try:
            for part in self._runs.DownloadCheckpoint(request, metadata=self._metadata):
                kind = part.WhichOneof("part")
                if kind == "info" and info is None:
                    info = part.info
                    name = info.file_name
                    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
                        raise fail(f"the coordinator named the file `{name}`, which is not a plain file name")
                    out = tempfile.NamedTemporaryFile(dir=dest, prefix=f".{name}.", suffix=".part", delete=False)
                elif kind == "data" and out is not None and sent is None:
                    written += len(part.data)
                    if written > info.size:
                        raise fail(f"{info.file_name}: more than the {info.size} bytes announced")
                    out.write(part.data)
                    digest.update(part.data)
                elif kind == "end" and out is not None:
                    sent = part.end.sha256
                else:
                    raise fail(f"unexpected `{kind}` message")
            if out is None or info is None:
                raise fail("the download sent nothing")
            out.close()
            if sent is None or written != info.size or digest.hexdigest() != sent:
                raise fail(
                    f"{info.file_name}: received {written} bytes with SHA-256 {digest.hexdigest()}; "
                    f"the coordinator sent {info.size} with {sent or 'no SHA-256'}"
                )
            target = dest / info.file_name
            os.replace(out.name, target)
            out = None
            return target
        except grpc.RpcError as e:
            raise NtError(e.code(), e.details() or "", "DownloadCheckpoint") from None
        finally:
            if out is not None:
                out.close()
                Path(out.name).unlink(missing_ok=True)

    def _upload_local_members(self, document: dict) -> None:
        members = document.get("members")
        if not isinstance(members, dict):
            return
        refs = members.get("checkpoints")
        if not isinstance(refs, list):
            return
        arch = document.get("architecture")
        if isinstance(arch, dict):
            arch = arch.get("spec") or arch.get("preset")
        for i, ref in enumerate(refs):
            if not isinstance(ref, str) or ref.startswith("store:") or "://" in ref:
                continue
            # Relative to the working directory, as `ntctl submit` reads them.
            local = Path(ref).expanduser()
            if ref.endswith(".index.json") and local.is_file():
                raise ValueError(
                    f"members.checkpoints[{i}]: {ref} is a sharded checkpoint; uploads take one "
                    "safetensors file (upload its shards to the store and name the index key)"
                )
            if local.is_file():
                refs[i] = self.upload(local, arch=arch).key


def _inline_architecture(document: dict, folder: Path) -> None:
    """`architecture: {file: x.json}` names a file on this machine: the
    coordinator cannot read it, so its spec goes in the document."""
    arch = document.get("architecture")
    if isinstance(arch, dict) and list(arch) == ["file"] and isinstance(arch["file"], str):
        path = folder / Path(arch["file"]).expanduser()
        try:
            document["architecture"] = {"spec": json.loads(path.read_text())}
        except (OSError, ValueError) as e:
            raise ValueError(f"architecture.file: {path}: {e}") from None


def _state(state: Optional[Union[int, str]]) -> int:
    if state is None:
        return 0
    if isinstance(state, int):
        return state
    name = state.upper()
    if not name.startswith("RUN_STATE_"):
        name = "RUN_STATE_" + name
    try:
        return RunState.Value(name)
    except ValueError:
        known = ", ".join(state_name(v) for v in RunState.values() if v)
        raise ValueError(f"unknown run state `{state}` (known: {known})") from None


def _yaml12_loader() -> Any:
    """PyYAML's safe loader with YAML 1.2's core schema, which ntctl's
    parser follows: `yes`, `on` and `0755` stay what YAML 1.2 makes of
    them (a string, a string, the number 755), not YAML 1.1's true, true
    and 493."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag.rsplit(":", 1)[-1] not in ("bool", "int", "float")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    core = [
        ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
        (
            "tag:yaml.org,2002:float",
            r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
            "-+0123456789.",
        ),
    ]
    for tag, rx, first in core:
        Loader.add_implicit_resolver(tag, re.compile(rx), list(first))

    def construct_int(loader: Any, node: Any) -> int:
        value = loader.construct_scalar(node)
        return int(value, 0) if value.startswith(("0o", "0x")) else int(value)

    Loader.add_constructor("tag:yaml.org,2002:int", construct_int)
    return Loader


def _spec_document(spec: Union[Mapping[str, Any], str, os.PathLike]) -> "tuple[dict, Path]":
    """A run spec as a dict, and the folder its relative paths start from."""
    import copy

    import yaml

    if isinstance(spec, Mapping):
        return copy.deepcopy(dict(spec)), Path.cwd()
    text, folder = None, Path.cwd()
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and "\n" not in spec and Path(spec).is_file()):
        path = Path(spec)
        text, folder = path.read_text(), path.resolve().parent
    elif isinstance(spec, str):
        text = spec
    else:
        raise TypeError(f"a run spec is a dict, YAML text, a path or an nt.v1.RunSpec, not {type(spec).__name__}")
    try:
        document = yaml.load(text, Loader=_yaml12_loader())
    except yaml.YAMLError as e:
        raise ValueError(f"the run spec is not YAML: {e}") from None
    if not isinstance(document, dict):
        raise ValueError("a run spec is a mapping of fields (name, data, architecture, members, ...)")
    return document, folder


def connect(
    endpoint: Optional[str] = None,
    token: Optional[str] = None,
    tls_ca: Optional[str] = None,
    tls_domain: Optional[str] = None,
    timeout: float = 10.0,
) -> Client:
    """Connects to nt's coordinator. Unset arguments come from `NT_ENDPOINT`,
    `NT_TOKEN`, `NT_TLS_CA` and `NT_TLS_DOMAIN`, then from ntctl's config
    file (see `ntpy.client.config`); an `https://` endpoint uses TLS,
    trusting `tls_ca` (else the system's roots) and verifying `tls_domain`
    (else the endpoint's host). Waits up to `timeout` seconds for the
    connection and raises `NtError(UNAVAILABLE)` when it fails."""
    settings = resolve(endpoint, token, tls_ca, tls_domain)
    options = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
    ]
    if settings.tls:
        ca = Path(settings.tls_ca).read_bytes() if settings.tls_ca else None
        if settings.tls_domain:
            options.append(("grpc.ssl_target_name_override", settings.tls_domain))
        channel = grpc.secure_channel(settings.target, grpc.ssl_channel_credentials(root_certificates=ca), options)
    else:
        channel = grpc.insecure_channel(settings.target, options)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        channel.close()
        raise NtError(
            grpc.StatusCode.UNAVAILABLE,
            f"cannot reach the coordinator at {settings.endpoint} within {timeout:g} s: "
            "connection failed (is nt-server running there? set endpoint= or NT_ENDPOINT)",
            "connect",
        ) from None
    return Client(settings, channel)
