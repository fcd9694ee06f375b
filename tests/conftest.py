"""Shared test setup. Session-wide fixtures that start real services live in the fixtures_*
modules below, one per tier, so that every test file shares one running stack."""

pytest_plugins = [
    "tests.fixtures_generator",
    "tests.fixtures_embedder",
    "tests.fixtures_gateway",
]
