"""The OpenAPI document: valid, listing every route the docs name, served by the real Envoy with
Swagger UI and ReDoc (rendered in Debian's chromium), and describing what the real stack answers.
Its freshness against the protos is `tools/protos.py --check`'s (tests/test_contract.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import pytest
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from openapi_spec_validator import validate
from playwright.async_api import ConsoleMessage, Request, async_playwright

from tests.fixtures_gateway import GatewayService
from tests.stack import ROOT
from tools.envoy_config import render_config
from tools.openapi import routes

COMMITTED = ROOT / "docs" / "openapi.json"
# Files whose tables list the REST routes (`GET /path`).
ROUTE_TABLES = (ROOT / "README.md", ROOT / "docs" / "architecture.md")
# ReDoc's bundle always shows Redocly's logo from its CDN and hides it when it cannot load; the
# only request allowed to leave Envoy.
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(COMMITTED.read_text())
    return data


@pytest.fixture(scope="module")
def rest(envoy_url: str, gateway_service: GatewayService) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=envoy_url, headers=gateway_service.headers("user"), timeout=120) as client:
        yield client


def test_the_document_validates(document: dict[str, Any]) -> None:
    validate(document)


def table_routes(path: Path) -> set[tuple[str, str]]:
    """Every `METHOD /path` in the rows of the file's Markdown tables."""
    found = set()
    for line in path.read_text().splitlines():
        if line.startswith("|"):
            for method, route in re.findall(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`\s]*)`", line):
                found.add((method, route))
    return found


def test_every_route_in_the_route_tables_is_documented(document: dict[str, Any]) -> None:
    listed = {route: path.name for path in ROUTE_TABLES for route in table_routes(path)}
    assert len(listed) >= 15, f"the route tables ({', '.join(p.name for p in ROUTE_TABLES)}) went missing"
    missing = [
        f"{method} {route} ({name})"
        for (method, route), name in listed.items()
        if (method, route) not in routes(document)
    ]
    assert not missing, f"listed but not in docs/openapi.json: {missing}"


def test_every_url_envoy_streams_on_is_documented_as_streaming(document: dict[str, Any]) -> None:
    lua = (ROOT / "envoy" / "envoy.yaml").read_text()
    pairs = re.findall(r'\["(/[^"]*)"\]\s*=\s*"(/[^"]*)"', lua)
    assert pairs, "no stream_paths table in envoy/envoy.yaml"
    for url, target in pairs:
        replies = document["paths"][url]["post"]["responses"]["200"]["content"]
        assert "text/event-stream" in replies and "application/json" in replies, url
        assert "text/event-stream" in document["paths"][target]["post"]["responses"]["200"]["content"], target


def test_envoy_serves_the_document_and_both_pages_with_their_assets(envoy_url: str) -> None:
    with httpx2.Client(base_url=envoy_url, timeout=30) as client:
        served = client.get("/openapi.json")
        assert served.status_code == 200 and served.headers["content-type"] == "application/json"
        assert served.json() == json.loads(COMMITTED.read_text())
        for page in ("/docs", "/redoc"):
            reply = client.get(page)
            assert reply.status_code == 200, page
            assert reply.headers["content-type"].startswith("text/html"), page
            assets = re.findall(r'(?:src|href)="(/[^"]+)"', reply.text)
            assert assets, page
            for asset in assets:
                loaded = client.get(asset)
                assert loaded.status_code == 200 and len(loaded.content) > 1000, asset
                assert loaded.headers["content-type"].startswith(CONTENT_TYPES[Path(asset).suffix]), asset
            assert "/openapi.json" in reply.text, page


def test_envoy_starts_without_the_docs_assets(tmp_path: Path) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text(
        render_config(18080, 19901, "127.0.0.1:15051", ROOT / "build" / "inference.pb", docs_assets=tmp_path)
    )
    envoy = shutil.which("envoy")
    assert envoy, "envoy is missing"
    result = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(config), "--base-id", "94"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_the_image_copies_every_asset_envoy_serves_at_the_makefiles_versions() -> None:
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    packages = re.findall(r"^(?:SWAGGER_UI|REDOC) := (\S+)$", makefile, re.M)
    assert len(packages) == 2, "the Makefile names the docs packages in SWAGGER_UI and REDOC"
    for package in packages:
        assert package in dockerfile, f"the Dockerfile does not install {package}"
    template = (ROOT / "envoy" / "envoy.yaml").read_text()
    served = re.findall(r"filename: \.tools/node_modules/([^\s}]+)", template)
    assert len(served) == 3
    for asset in served:
        folder = asset.rsplit("/", 1)[0]
        assert f"/ui/node_modules/{asset}" in dockerfile, asset
        assert f".tools/node_modules/{folder}/" in dockerfile, asset


def schema_validator(document: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator({**schema, "components": document["components"]})


def reply_schema(document: dict[str, Any], method: str, path: str, media: str = "application/json") -> Any:
    schema: dict[str, Any] = document["paths"][path][method]["responses"]["200"]["content"][media]["schema"]
    return schema


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/health", None),
        ("get", "/stats", None),
        ("get", "/models", None),
        ("get", "/v1/models", None),
        ("post", "/generate", {"prompt": "Paris is", "parameters": {"max_new_tokens": 3, "seed": 7}}),
        ("post", "/v1/completions", {"prompt": "Paris is", "max_tokens": 3, "seed": 7}),
    ],
)
def test_the_stack_answers_what_the_document_describes(
    document: dict[str, Any], rest: httpx2.Client, method: str, path: str, body: dict[str, Any] | None
) -> None:
    if path.startswith("/v1/") and body is not None:
        body = {**body, "model": rest.get("/v1/models").json()["data"][0]["id"]}
    reply = rest.request(method.upper(), path, json=body)
    assert reply.status_code == 200, reply.text
    schema_validator(document, reply_schema(document, method, path)).validate(reply.json())


def test_stream_events_are_the_documented_messages(document: dict[str, Any], rest: httpx2.Client) -> None:
    body = {"prompt": "Paris is", "stream": True, "parameters": {"max_new_tokens": 3}}
    validator = schema_validator(document, reply_schema(document, "post", "/generate", "text/event-stream"))
    with rest.stream("POST", "/generate", json=body) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [json.loads(item) for item in data[:-1]]
    assert events
    for event in events:
        validator.validate(event)


def test_a_native_error_is_the_documented_status(document: dict[str, Any], rest: httpx2.Client) -> None:
    reply = rest.post("/generate", json={"prompt": "x", "parameters": {"temperature": -1}})
    assert reply.status_code == 400
    error = document["components"]["responses"]["Error400"]["content"]["application/json"]["schema"]
    schema_validator(document, error).validate(reply.json())


@pytest.mark.parametrize(
    ("page", "operation"), [("/docs", ".opblock"), ("/redoc", "[data-section-id^='operation/']")]
)
async def test_the_page_renders_every_operation_in_a_browser(
    envoy_url: str, document: dict[str, Any], page: str, operation: str
) -> None:
    chromium = shutil.which("chromium")
    assert chromium, (
        "Debian's chromium is missing: `make test` installs it (apt-get install chromium, as root)"
    )
    problems: list[str] = []
    envoy_host = urlsplit(envoy_url).netloc

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and message.location.get("url") != REDOC_LOGO:
            problems.append(f"console: {message.text} ({message.location.get('url')})")

    def on_request(request: Request) -> None:
        where = urlsplit(request.url)
        if where.scheme in ("http", "https") and where.netloc != envoy_host and request.url != REDOC_LOGO:
            problems.append(f"request outside Envoy: {request.url}")

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            tab = await browser.new_page()
            tab.on("console", on_console)
            tab.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            tab.on("request", on_request)
            await tab.goto(envoy_url + page)
            await tab.wait_for_selector(operation, timeout=60_000)
            rendered = await tab.locator(operation).count()
            text = await tab.inner_text("body")
        finally:
            await browser.close()
    assert rendered == len(routes(document)), f"{page} shows {rendered} operations"
    for path in ("/v1/chat/completions", "/generate", "/embeddings/counter/{model}"):
        assert path in text, f"{page} does not show {path}"
    assert not problems, problems
