"""A real headless ComfyUI server for tests: `with ComfyServer([pack_dir]) as server: server.run(graph)`.

It listens on 127.0.0.1 only, on a free port, on the CPU, with every ComfyUI folder (models, custom_nodes,
input, output, temp, user, database) in a temporary directory. Only the given custom node folders are loaded
(linked into the temporary custom_nodes, everything else disabled), and API nodes are off.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from bench.comfyui_env import find_comfyui


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Context manager around `python main.py --cpu ...`; see the module docstring."""

    def __init__(
        self,
        extra_custom_nodes=(),
        comfyui: str | Path | None = None,
        startup_timeout: float = 90.0,
        extra_args=(),
    ):
        """extra_custom_nodes: folders, linked under their own names, or {name: folder} (the name is the one
        ComfyUI shows, e.g. in /extensions/<name>/). extra_args: more main.py arguments, e.g. ["--cache-lru", "20"]."""
        items = (
            extra_custom_nodes.items()
            if isinstance(extra_custom_nodes, dict)
            else [(Path(p).name, p) for p in extra_custom_nodes]
        )
        self.custom_nodes = {name: Path(p).resolve() for name, p in items}
        if len(self.custom_nodes) != len(items):
            raise ValueError(f"custom node folders need distinct names: {[name for name, _ in items]}")
        self.comfyui = Path(comfyui or find_comfyui() or "")
        if not (self.comfyui / "main.py").is_file():
            raise RuntimeError(f"no ComfyUI main.py in {self.comfyui!s} (set COMFYUI_PATH)")
        self.startup_timeout = startup_timeout
        self.extra_args = [str(arg) for arg in extra_args]
        self.process = None

    # -- life cycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> ComfyServer:
        self._tmp = tempfile.TemporaryDirectory(prefix="comfy-server-")
        self.base = Path(self._tmp.name)
        dirs = {name: self.base / name for name in ("custom_nodes", "models", "input", "output", "temp", "user")}
        for d in dirs.values():
            d.mkdir()
        for name, node_dir in self.custom_nodes.items():
            (dirs["custom_nodes"] / name).symlink_to(node_dir, target_is_directory=True)
        self.output_dir = dirs["output"]
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base),
            "--output-directory",
            str(dirs["output"]),
            "--input-directory",
            str(dirs["input"]),
            "--temp-directory",
            str(dirs["temp"]),
            "--user-directory",
            str(dirs["user"]),
            "--database-url",
            "sqlite:///:memory:",
            "--disable-api-nodes",
            "--disable-auto-launch",
            "--disable-all-custom-nodes",
        ]
        cmd += self.extra_args
        if self.custom_nodes:
            cmd += ["--whitelist-custom-nodes", *self.custom_nodes]
        self.log_path = self.base / "server.log"
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(cmd, cwd=self.comfyui, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self._tmp.cleanup()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode}\n{self.log_tail()}")
            try:
                self.object_info()
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        else:
            raise TimeoutError(f"ComfyUI did not answer in {self.startup_timeout:.0f} s\n{self.log_tail()}")
        ours = str(self.base / "custom_nodes")
        failed = [line for line in self.log().splitlines() if "IMPORT FAILED" in line and ours in line]
        if failed:
            raise RuntimeError("custom nodes failed to import: " + "; ".join(failed) + "\n" + self.log_tail(80))

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "--- server log (tail) ---\n" + "\n".join(self.log().splitlines()[-lines:])

    # -- HTTP -----------------------------------------------------------------------------------------------------

    def _request(self, path: str, body: dict | None = None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def object_info(self) -> dict:
        """GET /object_info: every node class the server knows, with its inputs and outputs."""
        return self._request("/object_info")

    def post_prompt(self, graph: dict) -> str:
        """Queue an API-format graph; returns its prompt id. Validation errors raise with ComfyUI's message."""
        try:
            answer = self._request("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"ComfyUI refused the prompt ({e.code}): {e.read().decode(errors='replace')}") from e
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """Poll GET /history/<id> until the prompt has finished; returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self._request(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the prompt\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 120.0) -> dict:
        """post_prompt + wait; raises with the execution error (and log tail) unless the status is success."""
        entry = self.wait(self.post_prompt(graph), timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
            raise RuntimeError(f"prompt failed: {json.dumps(errors, indent=1)[:4000]}\n{self.log_tail()}")
        return entry
