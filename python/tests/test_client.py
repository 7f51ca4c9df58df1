"""ntpy.client against a real nt-server and nt-worker on 127.0.0.1: a user
trains two members in PyTorch, uploads them, fuses them through the service,
watches the run, downloads the fine-tuned NT model and gets in PyTorch the
accuracy the report gives; cancelling and listing; a wrong token; bad
uploads that leave nothing behind; settings resolved as ntctl does."""

import gzip
import json
import os
import time

import grpc
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from cluster import CLIENT_TOKEN, Cluster
from ntpy.arch import arch_from_module, module_from_arch
from ntpy.client import NtError, connect, resolve, state_name

FASHION = os.environ.get("NT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def nt(cluster):
    with connect(cluster.endpoint, token=CLIENT_TOKEN) as client:
        yield client


def idx(name):
    with gzip.open(os.path.join(FASHION, f"{name}.gz")) as f:
        data = f.read()
    rank = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * rank).reshape(shape).copy()


class Net(nn.Module):
    """The user's own model: nt's `mlp:hidden=64,depth=1` by another name."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 64, bias=False)
        self.fc2 = nn.Linear(64, 10, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def train_member(seed, x, y):
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.randperm(len(x))
    for start in range(0, len(x), 128):
        batch = order[start : start + 128]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    return model


def test_a_user_fuses_their_pytorch_members_through_the_service(nt, cluster, tmp_path):
    x = torch.from_numpy(idx("train-images-idx3-ubyte")[:6000]).float()[:, None] / 255
    y = torch.from_numpy(idx("train-labels-idx1-ubyte")[:6000]).long()
    spec = arch_from_module(Net(), torch.randn(2, 1, 28, 28), name="user-mlp")
    files = []
    for seed in (1, 2):
        path = tmp_path / f"member{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in train_member(seed, x, y).state_dict().items()}, str(path))
        files.append(path)

    keys = [nt.upload(f, arch=json.dumps(spec)).key for f in files]
    assert all(k.startswith("uploads/") for k in keys), keys
    run = nt.submit(
        {
            "name": "pytorch-members",
            "data": {"dataset": "fashion-mnist", "train_subset": 4000},
            "architecture": {"spec": spec},
            "members": {"checkpoints": keys},
            "fusion": ["nt"],
            "fine_tuning": {"training": {"epochs": 1}},
        },
        request_id="pytest-fuse-1",
    )
    events = list(nt.watch(run.run_id))
    assert [e.sequence for e in events] == sorted({e.sequence for e in events})
    final = nt.get(run.run_id)
    assert state_name(final.state) == "succeeded", (final.message, cluster.logs())

    path = nt.download(run.run_id, model="nt", dest=tmp_path / "out")
    with safe_open(str(path), "pt") as f:
        norm = json.loads(f.metadata()["nt.input"])
    model = module_from_arch(str(path))
    model.load_state_dict(load_file(str(path)))
    model.eval()
    tx = torch.from_numpy(idx("t10k-images-idx3-ubyte")).float()[:, None] / 255
    tx = (tx - norm["mean"][0]) / norm["std"][0]
    ty = torch.from_numpy(idx("t10k-labels-idx1-ubyte")).long()
    with torch.no_grad():
        accuracy = (model(tx).argmax(1) == ty).float().mean().item()
    (fused,) = nt.report(run.run_id).fused
    reported = fused.after_fine_tuning
    assert reported.checkpoint.endswith("fine-tuned/nt.safetensors"), reported.checkpoint
    assert abs(reported.accuracy - accuracy) < 1e-4, (reported.accuracy, accuracy)

    # The same request id is the same run.
    again = nt.submit({"name": "x", "architecture": "mlp", "members": {"count": 2}}, request_id="pytest-fuse-1")
    assert again.run_id == run.run_id


def test_cancel_and_list(nt):
    long_run = nt.submit(
        {
            "name": "to-cancel",
            "data": {"dataset": "fashion-mnist", "train_subset": 2000},
            "architecture": "mlp:hidden=32,depth=1",
            "members": {"count": 2, "training": {"epochs": 500}},
        }
    )
    cancelled = nt.cancel(long_run.run_id, reason="pytest")
    deadline = time.time() + 60
    while state_name(cancelled.state) != "cancelled" and time.time() < deadline:
        time.sleep(0.2)
        cancelled = nt.get(long_run.run_id)
    assert state_name(cancelled.state) == "cancelled"
    assert "pytest" in cancelled.message
    listed = [r.run_id for r in nt.list(page_size=1)]
    assert long_run.run_id in listed and len(listed) >= 2
    assert [r.run_id for r in nt.list(state="cancelled")] == [long_run.run_id]
    with pytest.raises(ValueError, match="unknown run state"):
        list(nt.list(state="finished"))
    with pytest.raises(NtError) as e:
        nt.get("no-such-run")
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_a_wrong_token_is_unauthenticated(cluster, tmp_path):
    with connect(cluster.endpoint, token="not-the-token") as bad:
        for call in (lambda: bad.get("x"), lambda: list(bad.list()), lambda: bad.cancel("x")):
            with pytest.raises(NtError) as e:
                call()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert e.value.code_name == "UNAUTHENTICATED"
            assert "token" in str(e.value)
        path = tmp_path / "m.safetensors"
        save_file({"fc1.weight": torch.zeros(64, 784), "fc2.weight": torch.zeros(10, 64)}, str(path))
        with pytest.raises(NtError) as e:
            bad.upload(path)
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_a_spec_that_does_not_parse_names_the_field(nt):
    with pytest.raises(NtError) as e:
        nt.submit({"name": "typo", "architecture": "mlp", "members": {"count": 2}, "fusoin": ["nt"]})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "fusoin" in e.value.details


def test_settings_resolve_like_ntctl(tmp_path):
    config = tmp_path / "ntctl.yaml"
    config.write_text("endpoint: https://nt.example.com:7070\ntoken: from-file\ntls_domain: nt.example.com\n")
    env = {"NT_CONFIG": str(config), "NT_TOKEN": "from-env"}
    s = resolve(environ=env)
    assert (s.endpoint, s.token, s.tls_domain, s.tls, s.target) == (
        "https://nt.example.com:7070",
        "from-env",
        "nt.example.com",
        True,
        "nt.example.com:7070",
    )
    assert resolve(token="from-arg", environ=env).token == "from-arg"
    config.write_text("endpont: x\n")
    with pytest.raises(ValueError, match="endpont"):
        resolve(environ=env)
    home = tmp_path / "home"
    assert resolve(environ={"HOME": str(home)}).endpoint == "http://127.0.0.1:7070"


def test_connecting_to_nothing_says_so():
    with pytest.raises(NtError) as e:
        connect("http://127.0.0.1:1", token="x", timeout=0.5)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert "cannot reach the coordinator" in e.value.details


def test_the_readme_example_runs(cluster, tmp_path):
    import re
    import subprocess
    import sys

    from conftest import PYTHON_DIR, REPO

    readme = open(os.path.join(REPO, "README.md")).read()
    match = re.search(r"<!-- tested: python-sdk -->\n```python\n(.*?)```", readme, re.S)
    assert match, "README.md has no `<!-- tested: python-sdk -->` snippet"
    env = dict(os.environ, NT_ENDPOINT=cluster.endpoint, NT_TOKEN=CLIENT_TOKEN, PYTHONPATH=PYTHON_DIR)
    env.pop("NT_CONFIG", None)
    out = subprocess.run(
        [sys.executable, "-c", match.group(1)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr + cluster.logs()
    assert "succeeded" in out.stdout, out.stdout
    assert list((tmp_path / "out").glob("*.safetensors")), list(tmp_path.rglob("*"))


def test_watch_survives_a_coordinator_restart(tmp_path):
    """The coordinator goes away mid-run and comes back on the same store:
    the watch resumes after the last event it saw and ends with the run."""
    c = Cluster(tmp_path / "restart")
    try:
        with connect(c.endpoint, token=CLIENT_TOKEN) as nt:
            run = nt.submit(
                {
                    "name": "restart",
                    "data": {"dataset": "fashion-mnist", "train_subset": 2000, "test_subset": 500},
                    "architecture": "mlp:hidden=32,depth=1",
                    "members": {"count": 2, "training": {"epochs": 4}},
                    "fine_tuning": {"training": {"epochs": 1}},
                }
            )
            seen, restarted = [], False
            for event in nt.watch(run.run_id):
                seen.append(event.sequence)
                if not restarted and len(seen) >= 3:
                    c.stop_server()
                    time.sleep(1.0)
                    c.start_server()
                    restarted = True
            assert restarted
            assert seen == sorted(set(seen)), seen
            final = nt.get(run.run_id)
            assert state_name(final.state) == "succeeded", (final.message, c.logs())
    finally:
        c.stop()
