"""The `nginx` peer: Debian's nginx as a plain streaming reverse proxy in front of the fake
upstream (`proxy_buffering off`, HTTP/1.1 and kept-alive connections to the upstream, no
access log), one worker on the server's core. The load client reads it exactly as it
reads the upstream itself (`direct`): what a proxy written in C pays to pass each token
on, the mark issue 16 sets Rill against.

Its CPU and memory are the master's and its worker's together, read from /proc."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .run import CLOCK_TICKS, Processes, free_port, port_probe, wait_ready

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
# nginx run by a bench in a directory of its own (one worker, files and temp paths in it),
# around the `http` block's own lines.
MAIN = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{http}
}}
"""
# The peer: a plain streaming proxy in front of the fake upstream.
PROXY = """
    upstream model {{
        server 127.0.0.1:{upstream};
        keepalive 2048;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}"""


def main_config(directory: Path, http: str, connections: int) -> str:
    return MAIN.format(dir=directory, connections=connections, http=http)


def nginx_args(directory: Path) -> list[str]:
    """nginx in the foreground on `directory`'s nginx.conf."""
    return [NGINX, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-g", "daemon off;"]


def start_nginx(
    processes: Processes, work: Path, up_port: int, env: dict[str, str], core: int | None
) -> tuple[subprocess.Popen[bytes], str]:
    """nginx in front of the upstream, pinned (master and worker) to `core`: its process
    and URL."""
    directory = work / "nginx"
    directory.mkdir(exist_ok=True)
    port = free_port()
    proxy = PROXY.format(upstream=up_port, port=port)
    (directory / "nginx.conf").write_text(main_config(directory, proxy, connections=8192))
    args = nginx_args(directory)
    # Pinned before it starts: the worker it forks inherits the core.
    pinned = ["taskset", "-c", str(core), *args] if core is not None and shutil.which("taskset") else args
    process, log = processes.start("nginx", pinned, env, core)
    wait_ready(port_probe(port), process, log, "nginx")
    return process, f"http://127.0.0.1:{port}"


def family(pid: int) -> list[int]:
    """The process and its children (nginx's master and worker)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children += [int(child) for child in text]
    return [pid, *children]


def family_cpu_seconds(pid: int) -> float:
    total = 0.0
    for member in family(pid):
        fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    return total


def family_peak_rss_mb(pid: int) -> float:
    total = 0.0
    for member in family(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
    return total


def available() -> bool:
    return os.access(NGINX, os.X_OK)
