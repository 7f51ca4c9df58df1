"""nt's JSON is protobuf's own: what `ntctl --output json` prints, the
`report.json` and the run document (`run.json`) a real `ntctl run --local`
stores, read with `google.protobuf.json_format.Parse` into message classes
generated from `proto/` (with grpcio-tools, into a temporary folder), and
written back by json_format to the same JSON.

Each parse runs in a child Python: the generated modules register
`nt/v1/*.proto` in protobuf's default pool, which the SDK's committed stubs
(`ntpy._proto`) register too, and the two must not meet in one process.
Needs the ntctl and nt-server binaries (`cargo build --workspace`, or
$NT_BIN_DIR)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO

BIN_DIR = os.environ.get("NT_BIN_DIR", os.path.join(REPO, "target", "debug"))
PROTOS = [
    "nt/v1/spec.proto",
    "nt/v1/runs.proto",
    "nt/v1/workers.proto",
    "nt/store/v1/run_document.proto",
]
# A run that takes a second or two on one CPU thread and fills every part of
# the report: two members, two methods, distillation and the baseline.
SPEC = """
name: proto-json
data: {dataset: synthetic, synthetic: {train: 128, test: 32, classes: 4, shape: [1, 4, 4], noise: 0.3}}
architecture: "mlp:input=1x4x4,hidden=16,depth=1"
members:
  count: 2
  training: {epochs: 2, batch_size: 32, lr: 0.05}
fusion: [nt, average]
fine_tuning:
  training: {epochs: 1, batch_size: 32, lr: 0.05}
compare: {distillation: true, baseline: true}
device: cpu
labels: {purpose: proto-json}
"""
# Members whose training diverges: NaN losses in the run, which then fails.
DIVERGED = SPEC.replace("name: proto-json", "name: proto-json-diverged").replace("lr: 0.05", "lr: 1.0e30")
TOKEN = "proto-json-token"


def binary(name):
    path = os.path.join(BIN_DIR, name)
    if not os.access(path, os.X_OK):
        pytest.fail(f"no {name} at {path}: build it with `cargo build --workspace` (or set NT_BIN_DIR)")
    return path


def generate(out):
    """`*_pb2.py` for every proto, as a user of nt's protos would make them."""
    from grpc_tools import protoc

    args = ["grpc_tools.protoc", f"-I{os.path.join(REPO, 'proto')}", f"--python_out={out}", *PROTOS]
    assert protoc.main(args) == 0, "protoc failed"
    for folder in ["nt", "nt/v1", "nt/store", "nt/store/v1"]:
        open(os.path.join(out, folder, "__init__.py"), "a").close()


def parse(stubs, message, path, mode="one"):
    """Parses the file at `path` as `message` in a child Python: one message,
    one per line (`lines`), or one and then its `spec` bytes as a RunSpec
    (`spec`); returns what json_format writes for each, as dicts."""
    out = subprocess.run(
        [sys.executable, __file__, stubs, message, path, mode],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"json_format.Parse({os.path.basename(path)}, {message}()) failed:\n{out.stderr}"
    return json.loads(out.stdout)


def _child(stubs, message, path, mode):
    sys.path.insert(0, stubs)
    from google.protobuf import json_format

    import nt.store.v1.run_document_pb2 as store
    import nt.v1.runs_pb2 as runs
    import nt.v1.spec_pb2 as spec

    cls = {
        "nt.v1.Run": runs.Run,
        "nt.v1.RunEvent": runs.RunEvent,
        "nt.v1.RunReport": runs.RunReport,
        "nt.v1.ListRunsResponse": runs.ListRunsResponse,
        "nt.v1.SubmitRunResponse": runs.SubmitRunResponse,
        "nt.store.v1.RunDocument": store.RunDocument,
    }[message]
    with open(path) as f:
        text = f.read()
    texts = [t for t in text.splitlines() if t.strip()] if mode == "lines" else [text]
    # Strict: an unknown field name or enum value is an error.
    parsed = [json_format.Parse(t, cls()) for t in texts]
    if mode == "spec":
        # The run document's spec: the RunSpec as submitted, protobuf bytes.
        parsed = [spec.RunSpec.FromString(m.spec) for m in parsed]
    json.dump([json_format.MessageToDict(m) for m in parsed], sys.stdout)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A real local run, then a coordinator on its store answering ntctl."""
    d = tmp_path_factory.mktemp("proto-json")
    (d / "spec.yaml").write_text(SPEC)
    env = dict(os.environ, NT_THREADS="1", NT_DEVICE="cpu")
    for k in ("NT_ENDPOINT", "NT_TOKEN", "NT_OUTPUT", "NT_CONFIG"):
        env.pop(k, None)
    env["XDG_CONFIG_HOME"] = str(d / "no-config")
    ntctl = binary("ntctl")
    run = subprocess.run(
        [ntctl, "--output", "json", "run", "spec.yaml", "--local", "--store", "store"],
        cwd=d, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    (d / "run.jsonl").write_text(run.stdout)
    lines = run.stdout.splitlines()
    (d / "events.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    (d / "finished.json").write_text(lines[-1])
    run_id = json.loads(lines[-1])["runId"]
    (d / "diverged.yaml").write_text(DIVERGED)
    failed = subprocess.run(
        [ntctl, "--output", "json", "run", "diverged.yaml", "--local", "--store", "store"],
        cwd=d, env=env, capture_output=True, text=True, timeout=600,
    )
    assert failed.returncode == 2, failed.stderr
    diverged_id = json.loads(failed.stdout.splitlines()[-1])["runId"]

    port = free_port()
    server = subprocess.Popen(
        [binary("nt-server"), f"--store=file://{d / 'store'}", f"--listen=127.0.0.1:{port}",
         "--metrics-listen=", f"--client-token={TOKEN}", f"--worker-token={TOKEN}-worker"],
        stdout=open(d / "server.log", "wb"), stderr=subprocess.STDOUT, env=env,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (d / "server.log").read_text()
                time.sleep(0.05)

        def remote(name, *args):
            out = subprocess.run(
                [ntctl, "--endpoint", f"http://127.0.0.1:{port}", "--token", TOKEN, "--output", "json", *args],
                cwd=d, env=env, capture_output=True, text=True, timeout=120,
            )
            assert out.returncode == 0, out.stderr
            (d / name).write_text(out.stdout)

        remote("get.json", "get", run_id)
        remote("get-diverged.json", "get", diverged_id)
        remote("events-after-restart.jsonl", "events", run_id)
        remote("list.json", "list")
        remote("report.json", "report", run_id)
    finally:
        server.terminate()
        server.wait(timeout=30)
    stubs = d / "stubs"
    stubs.mkdir()
    generate(str(stubs))
    return {"dir": d, "run_id": run_id, "diverged_id": diverged_id, "stubs": str(stubs)}


def original(path, lines=False):
    with open(path) as f:
        text = f.read()
    if lines:
        return [json.loads(t) for t in text.splitlines() if t.strip()]
    return [json.loads(text)]


def test_ntctl_get_is_a_run(outputs):
    d = outputs["dir"]
    [run] = parse(outputs["stubs"], "nt.v1.Run", str(d / "get.json"))
    assert run["runId"] == outputs["run_id"]
    assert run["state"] == "RUN_STATE_SUCCEEDED"
    assert run["spec"]["fusion"] == ["FUSION_METHOD_NT", "FUSION_METHOD_AVERAGE"]
    assert run["spec"]["labels"] == {"purpose": "proto-json"}
    assert run["spec"]["architecture"] == {"preset": "mlp:input=1x4x4,hidden=16,depth=1"}
    assert {t["state"] for t in run["tasks"]} == {"TASK_STATE_SUCCEEDED"}
    report = run["report"]
    assert [f["method"] for f in report["fused"]] == ["FUSION_METHOD_NT", "FUSION_METHOD_AVERAGE"]
    assert int(report["members"][0]["parameters"]) > 0  # uint64: a string
    # json_format writes back exactly what ntctl printed: the same names,
    # the same defaults left out, the same spelling of every value.
    assert [run] == original(d / "get.json")
    # The last line of `run --output json` is the same run.
    assert parse(outputs["stubs"], "nt.v1.Run", str(d / "finished.json")) == [run]


def test_ntctl_events_are_run_events(outputs):
    d = outputs["dir"]
    for name in ["events.jsonl", "events-after-restart.jsonl"]:
        events = parse(outputs["stubs"], "nt.v1.RunEvent", str(d / name), "lines")
        assert events == original(d / name, lines=True)
        sequences = [int(e["sequence"]) for e in events]
        assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
        assert events[-1]["stateChanged"]["state"] == "RUN_STATE_SUCCEEDED"
    live = parse(outputs["stubs"], "nt.v1.RunEvent", str(d / "events.jsonl"), "lines")
    assert any("taskProgress" in e for e in live)
    assert live[0]["stateChanged"]["state"] == "RUN_STATE_QUEUED"


def test_the_stored_report_and_run_document_parse(outputs):
    d = outputs["dir"]
    report_path = str(d / "store" / "runs" / outputs["run_id"] / "report.json")
    [report] = parse(outputs["stubs"], "nt.v1.RunReport", report_path)
    assert report == original(report_path)[0]
    assert len(report["members"]) == 2 and "baseline" in report
    assert all("afterDistilledFineTuning" in f for f in report["fused"])
    [run] = parse(outputs["stubs"], "nt.v1.Run", str(d / "get.json"))
    assert report == run["report"]

    doc_path = str(d / "store" / "runs" / outputs["run_id"] / "run.json")
    [doc] = parse(outputs["stubs"], "nt.store.v1.RunDocument", doc_path)
    assert doc == original(doc_path)[0]
    assert doc["format"] == 4
    assert doc["runId"] == outputs["run_id"]
    assert doc["state"] == "RUN_STATE_SUCCEEDED"
    works = [next(iter(t["work"])) for t in doc["tasks"]]
    assert works == ["train", "train", "fineTune", "fineTune", "fineTune", "fineTune", "baseline", "evaluate"]
    # The spec inside is the RunSpec as submitted, protobuf in base64.
    [spec] = parse(outputs["stubs"], "nt.store.v1.RunDocument", doc_path, "spec")
    assert spec["name"] == "proto-json"
    assert spec["compare"] == {"distillation": True, "baseline": True}


def test_ntctl_list_is_a_list_runs_response(outputs):
    d = outputs["dir"]
    [page] = parse(outputs["stubs"], "nt.v1.ListRunsResponse", str(d / "list.json"))
    assert page == original(d / "list.json")[0]
    assert {r["runId"] for r in page["runs"]} == {outputs["run_id"], outputs["diverged_id"]}


def test_ntctl_report_is_the_run_report(outputs):
    d = outputs["dir"]
    [report] = parse(outputs["stubs"], "nt.v1.RunReport", str(d / "report.json"))
    assert report == original(d / "report.json")[0]
    stored = d / "store" / "runs" / outputs["run_id"] / "report.json"
    assert report == original(stored)[0]


def test_a_diverged_run_keeps_its_nans(outputs):
    """NaN losses are "NaN" in every JSON nt writes, which protobuf reads as
    NaN and writes back the same."""
    d = outputs["dir"]
    [run] = parse(outputs["stubs"], "nt.v1.Run", str(d / "get-diverged.json"))
    assert run == original(d / "get-diverged.json")[0]
    assert run["state"] == "RUN_STATE_FAILED"
    assert "non-finite" in run["message"]
    assert {t["progress"]["loss"] for t in run["tasks"]} == {"NaN"}
    doc_path = str(d / "store" / "runs" / outputs["diverged_id"] / "run.json")
    [doc] = parse(outputs["stubs"], "nt.store.v1.RunDocument", doc_path)
    assert doc == original(doc_path)[0]
    assert all(p["trainLoss"] == "NaN" for t in doc["tasks"] for p in t["curve"])


if __name__ == "__main__":
    _child(*sys.argv[1:5])
