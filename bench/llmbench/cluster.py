"""Several llm-ha instances that act as one: a Redis for their shared state, N mitmdumps, nginx in front.

    with RedisServer.start() as redis, LoadBalancer.start([p.port for p in proxies], workdir) as lb:
        ...  # redis.url (for the profile's shared_state), lb.url (what clients use)

One Python process uses one core; N instances on N ports behind a round-robin load balancer use N. The
load balancer is the one a user would pick: Debian's nginx, its default round-robin over an `upstream`,
streaming (`proxy_buffering off`). `python -m llmbench.cluster` (`make demo-cluster`) runs a small demo.

Redis and nginx are used as installed (Debian: `apt-get install -y redis-server nginx`); the tests skip
without them. Every process started here is stopped by `stop()` or the context manager: Redis keeps
nothing on disk (`--save '' --appendonly no`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmsim.control import free_port, start_simulator

from .peers import NGINX_PRELUDE
from .proxy import MitmProcess, start_mitmdump

STARTUP_TIMEOUT = 10.0


def redis_binary() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if os.access(p, os.X_OK)), None)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


class RedisServer:
    """`redis-server` on 127.0.0.1 without persistence; `stop()` and `start_again()` for outage tests."""

    def __init__(self, binary: str, port: int, log_path: str, password: str | None = None) -> None:
        self.binary = binary
        self.port = port
        self.password = password
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{port}/0"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @classmethod
    def start(cls, port: int | None = None, password: str | None = None) -> RedisServer:
        binary = redis_binary()
        if not binary:
            raise FileNotFoundError("no redis-server (Debian: apt-get install -y redis-server)")
        fd, log_path = tempfile.mkstemp(prefix="llm-ha-redis-", suffix=".log")
        os.close(fd)
        server = cls(binary, port or free_port(), log_path, password)
        server.start_again()
        return server

    def start_again(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--daemonize", "no", "--protected-mode", "yes"]
        if self.password:
            command += ["--requirepass", self.password]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start:\n{Path(self.log_path).read_text()[-2000:]}")
            time.sleep(0.05)

    def ping(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)


def nginx_conf(ports: list[int], listen: int) -> str:
    servers = "\n".join(f"        server 127.0.0.1:{port};" for port in ports)
    return f"""\
# written by llmbench.cluster: round-robin over {len(ports)} llm-ha instances
worker_processes auto;
pid nginx.pid;
{NGINX_PRELUDE}    upstream llm_ha {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{listen};
        client_max_body_size 10m;
        location / {{
            proxy_pass http://llm_ha;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_buffering off;          # stream the answers
            proxy_read_timeout 600s;      # llm-ha bounds the first byte itself
        }}
    }}
}}
"""


class LoadBalancer:
    """nginx, round-robin over the instances' ports, as a child process (its own prefix, pid and logs)."""

    def __init__(self, process: subprocess.Popen, port: int, prefix: Path) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.prefix = prefix

    @classmethod
    def start(cls, ports: list[int], workdir: str | os.PathLike) -> LoadBalancer:
        binary = nginx_binary()
        if not binary:
            raise FileNotFoundError("no nginx (Debian: apt-get install -y nginx)")
        prefix = Path(workdir) / "nginx"
        for sub in ("logs", "tmp"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        port = free_port()
        (prefix / "nginx.conf").write_text(nginx_conf(ports, port))
        process = subprocess.Popen([binary, "-p", str(prefix), "-c", "nginx.conf", "-g", "daemon off;"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        balancer = cls(process, port, prefix)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return balancer
            if process.poll() is not None or time.monotonic() > deadline:
                balancer.stop()
                log = (prefix / "logs" / "error.log")
                raise RuntimeError(f"nginx did not start:\n{log.read_text()[-2000:] if log.exists() else ''}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)

    def __enter__(self) -> LoadBalancer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def start_instances(profile: str | os.PathLike, count: int, reverse: str, *, confdir: str | None = None,
                    options: dict | None = None) -> list[MitmProcess]:
    """`count` reverse-proxy mitmdumps in front of `reverse` (the primary) with llm-ha and the same profile
    (so the same shared state), each with a status port."""
    started: list[MitmProcess] = []
    try:
        for _ in range(count):
            started.append(start_mitmdump(profile, reverse, confdir=confdir, options=options))
        return started
    except BaseException:
        for proxy in started:
            proxy.stop()
        raise


def wait_connected(proxies: list[MitmProcess], timeout: float = 10.0) -> None:
    for proxy in proxies:
        proxy.wait_for(lambda s: s.get("shared_state", {}).get("state") == "connected", timeout)


# -- make demo-cluster

DEMO_PROFILE = """\
first_byte_timeout: 2s
shared_state: "{redis}"
health_check: {{interval: 1s, base_ejection_time: 10s}}
upstreams:
  - name: primary
    nodes: ["{primary}"]
    max_inflight: 4
  - name: fallback
    nodes: ["{fallback}"]
"""


async def _demo_load(url: str, requests: int, concurrency: int) -> list[str]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="demo", max_retries=0, timeout=30)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> str:
        async with gate, client.chat.completions.with_streaming_response.create(
                model="m", messages=[{"role": "user", "content": f"request {i}"}], stream=True,
                max_tokens=48) as response:
            async for _ in response.iter_lines():
                pass
            return response.headers["x-llm-ha-upstream"]

    try:
        return await asyncio.gather(*(one(i) for i in range(requests)))
    finally:
        await client.close()


def demo(instances: int, requests: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory(prefix="llm-ha-cluster-") as workdir, RedisServer.start() as redis, \
            start_simulator() as primary, start_simulator("--preset", "fallback") as fallback:
        profile = Path(workdir) / "cluster.yaml"
        profile.write_text(DEMO_PROFILE.format(redis=redis.url, primary=primary.url, fallback=fallback.url))
        proxies = start_instances(profile, instances, primary.url)
        try:
            wait_connected(proxies)
            with LoadBalancer.start([p.port for p in proxies], workdir) as balancer:
                print(f"redis {redis.url}; {instances} llm-ha instances on ports "
                      f"{', '.join(str(p.port) for p in proxies)}; nginx round-robin at {balancer.url}")
                print(f"sending {requests} streamed requests, {concurrency} at a time; the primary's "
                      "max_inflight is 4 across all instances ...")
                served = asyncio.run(_demo_load(balancer.url, requests, concurrency))
            print(f"served: primary {served.count('primary')}, fallback {served.count('fallback')}; "
                  f"the primary's largest batch: {primary.stats()['peak_batch']} (limit 4)")
            for proxy in proxies:
                status = proxy.status()
                node = status["upstreams"][0]["nodes"][0]
                shared = status["shared_state"]
                print(f"  instance {status['instance']}: shared state {shared['state']}, lease round trip "
                      f"p50 {shared['acquire_ms_p50']} ms; primary attempts here {node['requests']}, "
                      f"shed here {node['shed']}")
        finally:
            for proxy in proxies:
                proxy.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llmbench.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=os.cpu_count() or 2, help="llm-ha processes; default: one a core")
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--concurrency", type=int, default=12)
    args = p.parse_args(argv)
    missing = [name for name, found in (("redis-server", redis_binary()), ("nginx", nginx_binary())) if not found]
    if missing:
        sys.exit(f"llm-ha demo-cluster needs {' and '.join(missing)} (Debian: apt-get install -y {' '.join(missing)})")
    demo(args.instances, args.requests, args.concurrency)


if __name__ == "__main__":
    main()
