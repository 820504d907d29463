"""Running servers: uvicorn in a background thread (tests, benchmarks) or as a child process.

Both bind 127.0.0.1 by default. A thread server is given an already-bound socket, so a random free
port is race-free; a child process gets a free port chosen here and is waited on via /health.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

LOOPBACK = "127.0.0.1"


def bind_socket(host: str = LOOPBACK, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def free_port(host: str = LOOPBACK) -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """`n` different free ports: bound all at once, since free_port() called n times can return one twice."""
    socks = [bind_socket(host) for _ in range(n)]
    try:
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class ServerThread:
    """`with ServerThread(app) as server: server.url` -- a live uvicorn server on a random loopback port."""

    def __init__(self, app, host: str = LOOPBACK, port: int = 0, log_level: str = "warning"):
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def wait_healthy(url: str, timeout: float = 120.0, process: subprocess.Popen | None = None) -> None:
    """Poll `url`/health until it answers 200 (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"server process for {url} exited with code {process.returncode}")
            try:
                if http.get(f"{url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"{url} not healthy after {timeout:.0f} s")


def spawn(command: str, args: list[str], port: int | None = None, host: str = LOOPBACK,
          log_file: Path | None = None, timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """Start `rsdjax <command> ... --host H --port P` as a child process; return it and its URL once healthy."""
    port = port or free_port(host)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    main = "import sys; from rsdjax.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", main, command, *args, "--host", host, "--port", str(port)],
                            stdout=out, stderr=subprocess.STDOUT if log_file else subprocess.DEVNULL, env=env)
    url = f"http://{host}:{port}"
    try:
        wait_healthy(url, timeout, proc)
    except BaseException:
        stop_process(proc)
        raise
    return proc, url


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
