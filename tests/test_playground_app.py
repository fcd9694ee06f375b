"""The playground app (clients/playground/app.py) run by Streamlit's AppTest against the real
stack's gateway (with API keys on): every tab, the API's errors as it words them, and Stop
cancelling the generation."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc
from inference_client import InferenceClient
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df
from streamlit.runtime.scriptrunner_utils.exceptions import StopException
from streamlit.testing.v1 import AppTest

from clients.playground import api
from tests.fixtures_gateway import GatewayService
from tests.stack import ROOT

APP = ROOT / "clients" / "playground" / "app.py"
RUN_TIMEOUT = 180.0
CAPTION = re.compile(r"^TTFT \d+\.\d\d s · \d+\.\d tokens/s · \d+ tokens · finish: [a-z ]+$")


@pytest.fixture
def app(gateway_service: GatewayService, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    """The app, set up by its environment variables for the shared gateway and the "user" key,
    after a first run."""
    monkeypatch.setenv("PLAYGROUND_GATEWAY_ADDRESS", gateway_service.address)
    monkeypatch.setenv("PLAYGROUND_API_KEY", gateway_service.keys["user"])
    # Nothing listens there: the Predictions tab stays hidden.
    monkeypatch.setenv("PLAYGROUND_PREDICTIONS_ADDRESS", "127.0.0.1:1")
    at = AppTest.from_file(str(APP), default_timeout=RUN_TIMEOUT).run()
    assert not at.exception, at.exception
    return at


def errors(at: AppTest) -> list[str]:
    return [str(item.value) for item in at.error]


def vega_charts(at: AppTest) -> list[Any]:
    """The Vega-Lite charts on the page (Altair's and st.line_chart's); AppTest has no type for them."""
    return [*at.get("vega_lite_chart"), *at.get("arrow_vega_lite_chart")]


def test_tabs_in_order_without_predictions(app: AppTest) -> None:
    assert [tab.label for tab in app.tabs] == ["Chat", "Math", "Coding", "Embeddings", "Status"]
    assert [title.value for title in app.title] == ["Inference playground"]
    assert errors(app) == []


@pytest.fixture
def health_server() -> Iterator[str]:
    """A gRPC server that answers only the standard health service, as the predictions service will."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_predictions_tab_appears_when_its_service_answers_health(
    gateway_service: GatewayService, health_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLAYGROUND_GATEWAY_ADDRESS", gateway_service.address)
    monkeypatch.setenv("PLAYGROUND_API_KEY", gateway_service.keys["user"])
    monkeypatch.setenv("PLAYGROUND_PREDICTIONS_ADDRESS", health_server)
    at = AppTest.from_file(str(APP), default_timeout=RUN_TIMEOUT).run()

    assert not at.exception, at.exception
    labels = [tab.label for tab in at.tabs]
    assert labels == ["Chat", "Math", "Coding", "Embeddings", "Predictions", "Status"]


def test_chat_streams_the_answer_with_its_timings(app: AppTest) -> None:
    app.slider(key="temperature").set_value(0.0)
    app.number_input(key="max_tokens").set_value(24)
    app.chat_input(key="chat_input").set_value("What is the capital of France?").run()

    assert not app.exception, app.exception
    assert errors(app) == []
    assistant = [message for message in app.chat_message if message.name == "assistant"]
    assert len(assistant) == 1
    assert "Paris" in assistant[0].markdown[0].value
    assert CAPTION.match(assistant[0].caption[0].value), assistant[0].caption[0].value
    turns = app.session_state["chat"]
    assert [turn.role for turn in turns] == ["user", "assistant"]
    assert turns[1].reply is not None and not turns[1].reply.stopped

    # The conversation stays across reruns, and Clear empties it.
    app.run()
    assert len([m for m in app.chat_message if m.name == "assistant"]) == 1
    app.button(key="chat_clear").click().run()
    assert app.session_state["chat"] == [] and len(app.chat_message) == 0


def test_math_shows_the_extracted_answer_apart_from_the_text(app: AppTest) -> None:
    app.slider(key="temperature").set_value(0.0)
    app.number_input(key="max_tokens").set_value(48)
    app.selectbox(key="math_example").set_value("Percent").run()
    assert app.text_area(key="math_problem").value == "What is 15% of 80?"

    app.button(key="math_solve").click().run()

    assert not app.exception, app.exception
    assert errors(app) == []
    answer = [metric for metric in app.metric if metric.label == "Answer"]
    assert len(answer) == 1 and answer[0].value.strip()
    result = app.session_state["math_result"]
    assert result.summary is not None and result.summary.answer == answer[0].value
    assert [expander.label for expander in app.expander] == ["Full text"]
    assert app.expander[0].markdown[0].value == result.text
    assert any(CAPTION.match(caption.value) for caption in app.caption)


def test_coding_shows_the_code_highlighted(app: AppTest) -> None:
    app.slider(key="temperature").set_value(0.0)
    app.number_input(key="max_tokens").set_value(48)
    app.button(key="coding_solve").click().run()

    assert not app.exception, app.exception
    assert errors(app) == []
    result = app.session_state["coding_result"]
    assert len(app.code) == 1
    assert app.code[0].value == result.summary.code and app.code[0].language == result.summary.language
    assert any(CAPTION.match(caption.value) for caption in app.caption)


def test_embeddings_draws_the_similarity_matrix(app: AppTest) -> None:
    sentences = ["The cat sits on the mat.", "A kitten rests on the rug.", "Stocks fell sharply today."]
    assert app.selectbox(key="embed_model").options, "no embedding model listed"
    app.text_area(key="embed_sentences").set_value("\n".join(sentences))
    app.button(key="embed_run").click().run()

    assert not app.exception, app.exception
    assert errors(app) == []
    shown = app.session_state["embed_result"]
    matrix = shown["matrix"]
    assert shown["sentences"] == sentences and len(matrix) == 3
    assert all(abs(matrix[i][i] - 1.0) < 1e-3 and len(matrix[i]) == 3 for i in range(3))
    assert matrix[0][1] > matrix[0][2], "the two sentences about a cat should be nearest"
    [heatmap] = [chart.proto for chart in vega_charts(app) if '"Cosine similarity"' in chart.proto.spec]
    assert json.loads(heatmap.spec)["layer"][0]["mark"]["type"] == "rect"
    [dataset] = heatmap.datasets
    drawn = convert_arrow_bytes_to_pandas_df(dataset.data.data)
    assert list(drawn["similarity"]) == [round(value, 4) for row in matrix for value in row]
    table = next(frame.value for frame in app.dataframe if "Nearest neighbour" in frame.value.columns)
    assert list(table["Sentence"]) == sentences
    assert table["Nearest neighbour"][0] == sentences[1]
    # The embedder's cache: the model just used is loaded.
    assert any("loaded" in caption.value and "MiB used" in caption.value for caption in app.caption)
    cached = next(frame.value for frame in app.dataframe if "Memory (MiB)" in frame.value.columns)
    assert shown["model"] in list(cached["Model"])


def test_status_shows_every_tier_serving_and_the_stats(app: AppTest, gateway_service: GatewayService) -> None:
    health = next(frame.value for frame in app.dataframe if "Tier" in frame.value.columns)
    assert {"gateway", "generator", "embedder"} <= set(health["Tier"])
    assert set(health["Status"]) == {"SERVING"}
    labels = {metric.label for metric in app.metric}
    assert {"Requests", "Running / waiting", "Tokens/s", "TTFT", "Inputs embedded", "Cache hits"} <= labels
    assert len(app.session_state["status_history"].samples) == 1

    with InferenceClient(gateway_service.address, api_key=gateway_service.keys["user"]) as client:
        generated = client.generate("Once upon a time", max_new_tokens=8, temperature=0.0).tokens_generated
    app.run()

    first, second = app.session_state["status_history"].samples
    assert second.generated_tokens - first.generated_tokens >= generated > 0
    assert second.tokens_per_second > 0
    lines = [chart for chart in vega_charts(app) if '"line"' in chart.proto.spec]
    assert len(lines) == 3


def test_out_of_range_max_tokens_shows_the_api_error_naming_the_field(app: AppTest) -> None:
    app.number_input(key="max_tokens").set_value(1_000_000)
    app.chat_input(key="chat_input").set_value("Hello").run()

    assert not app.exception, app.exception
    [error] = errors(app)
    assert error.startswith("INVALID_ARGUMENT: ")
    assert "max_new_tokens" in error and "1000000" in error
    assert app.session_state["chat"] == [], "a refused prompt is not kept"


def test_bad_seed_is_refused_before_calling(app: AppTest) -> None:
    app.text_input(key="seed").set_value("abc")
    app.chat_input(key="chat_input").set_value("Hello").run()

    assert errors(app) == ["Seed must be a whole number, got 'abc'"]


def test_bad_api_key_shows_unauthenticated_and_a_good_key_works(
    app: AppTest, gateway_service: GatewayService
) -> None:
    app.text_input(key="api_key").set_value("sk-not-a-key").run()

    assert not app.exception, app.exception
    assert errors(app) and all(error.startswith("UNAUTHENTICATED: ") for error in errors(app))

    app.text_input(key="api_key").set_value(gateway_service.keys["user"]).run()
    assert errors(app) == []
    app.button(key="embed_run").click().run()
    assert errors(app) == [] and len(app.session_state["embed_result"]["matrix"]) == 3


def generator_running(client: InferenceClient) -> int:
    return sum(item.requests_running for item in client.stats() if item.component == "generator")


def test_stop_cancels_the_generation(gateway_service: GatewayService) -> None:
    """What the Stop button does: Streamlit raises StopException in the script thread at the next
    element update, and the streaming helper's finally cancels the call, freeing the slot."""
    with InferenceClient(gateway_service.address, api_key=gateway_service.keys["user"]) as client:
        stream = client.chat_stream(
            [("user", "Count from one to one thousand in words.")], max_new_tokens=2000, temperature=0.0
        )
        reply = api.Reply()
        seen: list[str] = []

        def show(text: str) -> None:
            seen.append(text)
            if len(seen) == 3:
                # Pressing Stop: the next element update raises this in the script thread.
                raise StopException()

        with pytest.raises(StopException):
            api.follow(stream, reply, show)
        assert reply.stopped and reply.text == seen[-1]
        assert reply.caption.endswith("finish: stopped")

        deadline = time.monotonic() + 20
        while generator_running(client) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert generator_running(client) == 0, "the generator kept generating after Stop"


def test_a_new_run_cancels_the_reply_the_stopped_run_was_streaming(
    app: AppTest, gateway_service: GatewayService
) -> None:
    """With Streamlit's fast reruns, Stop starts a new run while the old one still waits for its
    next token: the new run cancels the call it left at once."""
    with InferenceClient(gateway_service.address, api_key=gateway_service.keys["user"]) as client:
        reply = api.Reply()
        stream = client.chat_stream(
            [("user", "Count from one to one thousand in words.")], max_new_tokens=2000, temperature=0.0
        )
        reply.stream = stream
        first = next(iter(stream))
        assert first.id >= 0 and generator_running(client) == 1
        app.session_state["streaming_reply"] = reply

        app.run()

        assert "streaming_reply" not in app.session_state
        deadline = time.monotonic() + 20
        while generator_running(client) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert generator_running(client) == 0, "the abandoned call kept generating"
