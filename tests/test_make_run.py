"""`make run` as a user runs it: on free ports (through the environment variables the services
read), until every tier is SERVING; then the README's examples and the commands it printed work
against it, and SIGTERM leaves nothing running. The models load once for the whole session
(tests/fixtures_make_run.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.fixtures_make_run import PORT_VARIABLES, RunningStack, clean_environment, port_open
from tests.stack import ROOT, free_port

DEFAULTS = {
    "8080": "ENVOY_PORT",
    "50051": "GATEWAY_PORT",
    "50052": "GENERATOR_PORT",
    "50053": "EMBEDDER_PORT",
    "8501": "PLAYGROUND_PORT",
}


@pytest.fixture
def stack(make_run: RunningStack) -> RunningStack:
    """The session's `make run` (tests/fixtures_make_run.py)."""
    return make_run


def with_test_ports(text: str, ports: dict[str, int]) -> str:
    for default, variable in DEFAULTS.items():
        text = text.replace(f"localhost:{default}", f"localhost:{ports[variable]}")
    return text


def readme_examples() -> list[tuple[str, str]]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- examples:start -->", 1)[1].split("<!-- examples:end -->", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, re.S)


def run_example(language: str, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    args = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_make_run_prints_every_tier_and_the_commands_to_try(stack: RunningStack) -> None:
    output = stack.output()
    ports = stack.ports
    for name in ("generator", "embedder", "gateway", "envoy", "playground"):
        assert re.search(rf"\b{name} is SERVING after", output), (
            f"no SERVING line for {name}:\n{stack.tail()}"
        )
    assert f"http://localhost:{ports['ENVOY_PORT']}" in output
    for tier in ("gateway", "generator", "embedder"):
        assert f"localhost:{ports[tier.upper() + '_PORT']}" in output
        assert f"http://localhost:{ports[tier.upper() + '_METRICS_PORT']}/metrics" in output
    for command in ("curl -s", "grpcurl -plaintext", "from openai import OpenAI"):
        assert command in output, f"make run did not print the {command.split()[0]} command"
    assert f"http://localhost:{ports['ENVOY_PORT']}/docs" in output
    assert re.search(rf"Playground \(browser\) +http://localhost:{ports['PLAYGROUND_PORT']}\n", output)


def test_make_run_serves_the_playground(stack: RunningStack) -> None:
    base = f"http://127.0.0.1:{stack.ports['PLAYGROUND_PORT']}"
    with urllib.request.urlopen(base + "/_stcore/health", timeout=30) as reply:
        assert reply.status == 200 and reply.read() == b"ok"
    with urllib.request.urlopen(base + "/", timeout=30) as reply:
        assert reply.status == 200 and b"<title>Streamlit</title>" in reply.read()


def test_make_run_serves_the_api_docs(stack: RunningStack) -> None:
    base = f"http://127.0.0.1:{stack.ports['ENVOY_PORT']}"
    pages = (("/openapi.json", "application/json"), ("/docs", "text/html"), ("/redoc", "text/html"))
    for path, media in pages:
        with urllib.request.urlopen(base + path, timeout=30) as reply:
            assert reply.status == 200 and reply.headers["content-type"].startswith(media), path
    with urllib.request.urlopen(base + "/docs/swagger-ui-bundle.js", timeout=30) as reply:
        assert reply.status == 200 and len(reply.read()) > 100_000


def test_commands_make_run_printed_work(stack: RunningStack) -> None:
    lines = stack.output().splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip().endswith("| Try:"))
    commands = [line.split("|   ", 1)[1] for line in lines[start + 1 : start + 4]]
    assert len(commands) == 3
    for command in commands:
        result = run_example("bash", command)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        assert result.stdout.strip(), command


def test_readme_examples_work_against_make_run(stack: RunningStack) -> None:
    examples = readme_examples()
    assert {language for language, _ in examples} == {"bash", "python"}
    assert len(examples) >= 5
    for language, code in examples:
        result = run_example(language, with_test_ports(code, stack.ports))
        assert result.returncode == 0, f"{code}\n{result.stdout}\n{result.stderr}"
        out = result.stdout
        if "/v1/chat/completions" in code and '"stream": true' in code:
            assert out.rstrip().endswith("data: [DONE]"), out[-500:]
        elif "/v1/chat/completions" in code:
            assert "Paris" in json.loads(out)["choices"][0]["message"]["content"], out
        elif "/v1/embeddings" in code:
            assert len(json.loads(out)["data"][0]["embedding"]) == 384, out[:300]
        elif "grpcurl" in code:
            assert "Paris" in json.loads(out)["generated_text"], out
        elif "InferenceClient" in code:
            assert "Paris" in out and out.strip().endswith("384"), out
        else:
            assert "Paris" in out, out


def test_metrics_endpoints_answer(stack: RunningStack) -> None:
    import urllib.request

    for tier in ("gateway", "generator", "embedder"):
        url = f"http://127.0.0.1:{stack.ports[tier.upper() + '_METRICS_PORT']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.status == 200
            assert f"{tier}_" in reply.read().decode()


@pytest.mark.stops_make_run
def test_sigterm_stops_every_process(stack: RunningStack) -> None:
    """Stops the shared stack: runs after every other test that uses it."""
    assert len(stack.descendants) >= 5, [p.info for p in stack.descendants]
    stack.process.send_signal(signal.SIGTERM)
    stack.process.wait(timeout=60)
    deadline = time.monotonic() + 30
    alive = [p for p in stack.descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    while alive and time.monotonic() < deadline:
        time.sleep(0.25)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running after SIGTERM: {[(p.pid, p.cmdline()) for p in alive]}\n{stack.tail()}"
    assert not [name for name, port in stack.ports.items() if port_open(port)]
    assert "stopped all tiers" in stack.output(), stack.tail()


def test_a_tier_that_dies_is_reported_and_the_others_stopped(tmp_path: Path) -> None:
    ports = {name: free_port() for name in PORT_VARIABLES}
    env = clean_environment({name: str(port) for name, port in ports.items()})
    env["GENERATOR_MODEL"] = str(tmp_path / "no-such-model.gguf")
    process = subprocess.Popen(
        [sys.executable, "-m", "tools.run", "--run-dir", str(tmp_path / "run")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"the generator with a missing model did not exit:\n{output[-3000:]}")
    result = subprocess.CompletedProcess(process.args, process.returncode, output, "")
    assert result.returncode == 1, result.stdout[-3000:]
    report = result.stdout.split("make run: generator exited with code", 1)
    assert len(report) == 2, result.stdout[-3000:]
    # The tail of the generator's own log names what went wrong.
    assert "no-such-model.gguf" in report[1], report[1]
    assert not [name for name, port in ports.items() if port_open(port)]


def test_a_port_in_use_is_named_before_anything_starts(tmp_path: Path) -> None:
    ports = {name: free_port() for name in PORT_VARIABLES}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", ports["GATEWAY_PORT"]))
        listener.listen()
        result = subprocess.run(
            [sys.executable, "-m", "tools.run", "--run-dir", str(tmp_path / "run")],
            cwd=ROOT,
            env=clean_environment({name: str(port) for name, port in ports.items()}),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stdout
    assert f"already in use: GATEWAY_PORT={ports['GATEWAY_PORT']}" in result.stdout
    assert not (tmp_path / "run" / "logs" / "generator.log").exists()
