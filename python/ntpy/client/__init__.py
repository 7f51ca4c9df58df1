"""A Python client of nt's coordinator: what `ntctl`'s remote verbs do,
from Python, with only an endpoint and a token.

    from ntpy.client import connect

    with connect("http://127.0.0.1:7070", token="s3cret") as nt:
        run = nt.submit("examples/fuse-existing.yaml", request_id="nightly-2026-12-01")
        final = nt.wait(run.run_id, on_event=print)
        path = nt.download(run.run_id, model="nt", dest="out/")

Messages are the generated classes of `proto/` (`ntpy.client.Run`, ...),
so `google.protobuf.json_format` reads and writes them; errors are
[`NtError`] with the gRPC status code and the server's message.
"""

from .config import ConfigError, Settings, resolve
from ._client import (
    FINAL_STATES,
    Client,
    NtError,
    Run,
    RunEvent,
    RunReport,
    RunSpec,
    RunState,
    Upload,
    connect,
    state_name,
)

__all__ = [
    "FINAL_STATES",
    "Client",
    "ConfigError",
    "NtError",
    "Run",
    "RunEvent",
    "RunReport",
    "RunSpec",
    "RunState",
    "Settings",
    "Upload",
    "connect",
    "resolve",
    "state_name",
]
