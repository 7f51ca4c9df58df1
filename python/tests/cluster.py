"""A real nt cluster on 127.0.0.1 for the SDK's tests: `nt-server` and one
`nt-worker` (this checkout's target/debug binaries, or $NT_BIN_DIR) on a
local file store, with a client and a worker token."""

import os
import socket
import subprocess
import time
from pathlib import Path

from conftest import REPO

BIN_DIR = Path(os.environ.get("NT_BIN_DIR", os.path.join(REPO, "target", "debug")))
CLIENT_TOKEN = "client-secret"
WORKER_TOKEN = "worker-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary(name: str) -> str:
    path = BIN_DIR / name
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"no {name} binary at {path}: build it with `cargo build --workspace` (or set NT_BIN_DIR)")
    return str(path)


class Cluster:
    """Starts on construction; `stop()` (or the fixture) ends it."""

    def __init__(self, folder: Path, server_args=(), worker_args=()):
        self.folder = folder
        self.store = folder / "store"
        self.store.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server_args = list(server_args)
        self.worker_args = list(worker_args)
        self.server = None
        self.worker = None
        self.start_server()
        self.start_worker()

    def _spawn(self, args, log_name):
        log = open(self.folder / log_name, "ab")
        env = dict(os.environ, RUST_LOG="info")
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)

    def start_server(self):
        self.server = self._spawn(
            [
                binary("nt-server"),
                f"--store=file://{self.store}",
                f"--listen=127.0.0.1:{self.port}",
                "--metrics-listen=",
                f"--client-token={CLIENT_TOKEN}",
                f"--worker-token={WORKER_TOKEN}",
                "--lease-ttl-ms=2500",
                "--heartbeat-interval-ms=300",
                *self.server_args,
            ],
            "server.log",
        )
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"nt-server did not start:\n{self.logs()}")
                time.sleep(0.05)

    def stop_server(self):
        if self.server is not None:
            self.server.terminate()
            self.server.wait(timeout=30)
            self.server = None

    def start_worker(self):
        self.worker = self._spawn(
            [
                binary("nt-worker"),
                f"--store=file://{self.store}",
                f"--coordinator={self.endpoint}",
                f"--worker-token={WORKER_TOKEN}",
                "--name=pytest-worker",
                "--device=cpu",
                "--threads=1",
                "--shutdown-grace-secs=2",
                *self.worker_args,
            ],
            "worker.log",
        )

    def stop(self):
        for proc in (self.worker, self.server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in (self.worker, self.server):
            if proc is not None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        self.worker = self.server = None

    def logs(self) -> str:
        out = []
        for p in sorted(self.folder.glob("*.log")):
            text = p.read_text(errors="replace")
            out.append(f"===== {p.name} =====\n{text[-4000:]}")
        return "\n".join(out)

    def objects(self, prefix: str = "") -> list:
        """Keys in the store under `prefix`."""
        root = self.store / prefix
        if not root.exists():
            return []
        return sorted(str(p.relative_to(self.store)) for p in root.rglob("*") if p.is_file())
