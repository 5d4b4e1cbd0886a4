"""`bastion run` as a person starts it (`make run`'s platform file: Ray, the gateway, two vLLM CPU replicas): the
terminal shows a short progress and the summary, and Ray's and vLLM's logs are in `<data_dir>/logs`.

One real start, in its own process group, stopped by SIGTERM. Its data directory is fresh apart from the
prepared bundled model (linked), so it is a first start: the API key is printed once.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 600  # two vLLM CPU engines load on a shared two-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _platform_file(tmp_path: Path, bundled_model: Path) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(bundled_model.parent, target_is_directory=True)
    data = yaml.safe_load((ROOT / "deploy/local/bastion.yaml").read_text())
    data["data_dir"] = str(data_dir)
    data["gateway"]["port"] = _free_port()
    path = tmp_path / "bastion.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _read_until(proc: subprocess.Popen[str], marker: str, lines: list[str], timeout_s: float) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            lines.append(line.rstrip("\n"))
            if line.startswith(marker):
                return
        elif proc.poll() is not None:
            break
    raise AssertionError(f"no {marker!r} line (rc {proc.poll()}); the terminal showed:\n" + "\n".join(lines))


@pytest.mark.timeout(START_TIMEOUT_S + 180)
def test_run_shows_progress_and_summary_and_logs_to_files(tmp_path: Path, bundled_model: Path) -> None:
    path = _platform_file(tmp_path, bundled_model)
    logs = tmp_path / "data" / "logs"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-c", "from bastion.cli import main; main()", "run", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        _read_until(proc, "Try: curl", lines, START_TIMEOUT_S)
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    lines += rest.splitlines()
    terminal = "\n".join(lines)
    assert proc.returncode == 0, terminal + "\n" + err
    try:  # the first start's key is on the terminal, never in the logs
        import secret_scan

        key = re.search(r"\(shown once, stored hashed\): (\S+)", terminal)
        assert key is not None, terminal
        secret_scan.register_secret(key.group(1))
        secret_scan.register_log_dir(logs)
    except ImportError:
        pass

    # Short, and none of Ray's, Serve's or vLLM's own lines.
    assert len(lines) < 25, terminal
    assert not re.search(r"\b(INFO|WARNING|DEBUG)\b|pid=|ServeReplica|raylet", terminal), terminal
    assert not re.search(r"\b(INFO|WARNING)\b|vllm", err), err  # stderr went to logs/bastion.log
    assert re.search(r"smollm2-135m@deep-context +ready × 1 +speculation off +guard: \S", terminal), terminal
    assert re.search(r"smollm2-135m@fast-agentic +ready × 1 +speculation mtp k=1 +guard: \S", terminal), terminal
    assert "placement: 2 replicas on 1 node" in terminal
    assert f"http://127.0.0.1:{yaml.safe_load(path.read_text())['gateway']['port']}/v1" in terminal
    assert "Profiles: deep-context, fast-agentic" in terminal and "Console: bastion control serve" in terminal
    assert lines[-1] == "Bastion stopped."

    # The logs: vLLM's engine start in vllm.log (both engines), Ray's session linked, the driver's stderr.
    vllm_log = (logs / "vllm.log").read_text()
    assert vllm_log.count("Initializing a V1 LLM engine") >= 2, vllm_log[-2000:]
    assert (logs / "ray").is_symlink() and any((logs / "ray").glob("worker-*"))
    assert (logs / "bastion.log").is_file()
