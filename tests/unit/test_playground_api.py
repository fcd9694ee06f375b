"""The playground's pure parts without a stack: settings from the environment, sampling options
from the form, timing captions, Stop cancelling a stream, similarity maths, the status history,
the chart records, and the Predictions tab's calls against a fake predictions service."""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Iterator, Mapping
from typing import Any

import grpc
import pytest
from inference_client import (
    ComponentStats,
    FinishReason,
    InvalidArgumentError,
    Prediction,
    PredictionMetrics,
    PredictionPage,
    PredictionsClient,
    PredictionUrls,
    StreamSummary,
    StreamToken,
)

from clients.playground import api, charts


def test_settings_defaults_and_environment() -> None:
    assert api.Settings.from_env({}) == api.Settings("localhost:50051", "", "localhost:50054", 2.0)
    settings = api.Settings.from_env(
        {
            "PLAYGROUND_GATEWAY_ADDRESS": "gateway:50051",
            "PLAYGROUND_API_KEY": " sk-1 ",
            "PLAYGROUND_PREDICTIONS_ADDRESS": "predictions:50054",
            "PLAYGROUND_REFRESH_SECONDS": "0.5",
        }
    )
    assert settings == api.Settings("gateway:50051", "sk-1", "predictions:50054", 0.5)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_refresh_must_be_a_positive_number(value: str) -> None:
    with pytest.raises(ValueError, match="PLAYGROUND_REFRESH_SECONDS must be a positive number"):
        api.Settings.from_env({"PLAYGROUND_REFRESH_SECONDS": value})


def test_sampling_options_leave_out_the_server_defaults() -> None:
    options = api.sampling_options(temperature=0.7, top_p=1.0, top_k=0, max_tokens=256)
    assert options == {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 256}


def test_sampling_options_pass_seed_stops_and_top_k() -> None:
    options = api.sampling_options(
        temperature=0.0, top_p=0.9, top_k=40, max_tokens=16, seed=" 7 ", stop="\\n\\n, END ,, ###"
    )
    assert options == {
        "temperature": 0.0,
        "top_p": 0.9,
        "max_new_tokens": 16,
        "top_k": 40,
        "seed": 7,
        "stop": ["\\n\\n", "END", "###"],
    }


def test_out_of_range_values_are_left_for_the_api_to_judge() -> None:
    options = api.sampling_options(temperature=500.0, top_p=1.0, top_k=0, max_tokens=10**6)
    assert options["temperature"] == 500.0 and options["max_new_tokens"] == 10**6


def test_a_seed_that_is_not_a_number_names_the_control() -> None:
    with pytest.raises(api.FormError, match="Seed must be a whole number, got 'abc'"):
        api.sampling_options(temperature=0.7, top_p=1.0, top_k=0, max_tokens=8, seed="abc")


def test_error_text_is_the_apis_words() -> None:
    error = InvalidArgumentError(
        grpc.StatusCode.INVALID_ARGUMENT, "parameters.temperature: must be in [0, 100], got 500"
    )
    assert api.error_text(error) == "INVALID_ARGUMENT: parameters.temperature: must be in [0, 100], got 500"


def test_conversation_puts_the_system_prompt_first_and_skips_empty_turns() -> None:
    stopped_early = api.Reply(stopped=True)
    answered = api.Reply(text="Hello!")
    turns = [
        api.Turn("user", "Hi"),
        api.Turn("assistant", reply=stopped_early),
        api.Turn("user", "Again"),
        api.Turn("assistant", reply=answered),
    ]
    assert api.conversation("  Be brief. ", turns) == [
        ("system", "Be brief."),
        ("user", "Hi"),
        ("user", "Again"),
        ("assistant", "Hello!"),
    ]
    assert api.conversation("", [api.Turn("user", "Hi")]) == [("user", "Hi")]


def test_timing_caption_from_the_client_side() -> None:
    timing = api.Timing(started=10.0)
    for moment in (10.12, 10.2, 10.3, 10.4, 10.5):
        timing.token(moment)
    timing.end(10.5)
    assert api.caption(timing, "stop") == "TTFT 0.12 s · 10.5 tokens/s · 5 tokens · finish: stop"


def test_caption_prefers_the_servers_count_and_rate() -> None:
    timing = api.Timing(started=0.0)
    timing.token(0.5)
    timing.end(1.0)
    summary = StreamSummary(0, "Paris", 40, 1.7, 23.44, FinishReason.EOS_TOKEN)
    reply = api.Reply(text="Paris", timing=timing, summary=summary, stopped=False)
    assert reply.caption == "TTFT 0.50 s · 23.4 tokens/s · 40 tokens · finish: stop"


def test_caption_before_any_token() -> None:
    assert api.Reply().caption == "TTFT – · 0.0 tokens/s · 0 tokens · finish: stopped"


class FakeStream:
    """A token stream that records whether it was cancelled."""

    def __init__(self, texts: list[str], summary: StreamSummary | None) -> None:
        self.texts = texts
        self.summary = summary
        self.cancelled = False

    def __iter__(self) -> Iterator[StreamToken]:
        for position, text in enumerate(self.texts):
            yield StreamToken(text=text, id=position, logprob=0.0, special=False)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def summaries(self) -> dict[int, StreamSummary]:
        return {} if self.summary is None else {0: self.summary}


class Stopped(BaseException):
    """Stands for Streamlit's StopException, which derives from BaseException too."""


def test_follow_fills_the_reply_and_ends_with_the_summary() -> None:
    summary = StreamSummary(0, "The capital is Paris.", 6, 0.3, 20.0, FinishReason.EOS_TOKEN)
    stream = FakeStream(["The", " capital", "", " is", " Paris", "."], summary)
    reply = api.Reply()
    shown: list[str] = []

    api.follow(stream, reply, shown.append)

    assert shown[-1] == reply.text == "The capital is Paris."
    assert len(shown) == 5, "a token without text does not redraw"
    assert reply.timing.tokens == 6 and not reply.stopped and reply.summary is summary
    assert reply.caption.endswith("· 6 tokens · finish: stop")
    assert stream.cancelled, "cancelling a finished call is harmless and always done"


def test_stop_during_the_stream_cancels_it_and_keeps_the_partial_reply() -> None:
    stream = FakeStream(["one", " two", " three", " four"], None)
    reply = api.Reply()

    def show(text: str) -> None:
        if text == "one two":
            raise Stopped

    with pytest.raises(Stopped):
        api.follow(stream, reply, show)

    assert stream.cancelled
    assert reply.stopped and reply.text == "one two" and reply.summary is None
    assert reply.stream is stream
    assert reply.caption.endswith("· 2 tokens · finish: stopped")


@pytest.mark.parametrize(
    ("reason", "word"),
    [
        (FinishReason.EOS_TOKEN, "stop"),
        (FinishReason.STOP_SEQUENCE, "stop sequence"),
        (FinishReason.LENGTH, "length"),
        (FinishReason.CONSTRAINT_COMPLETE, "constraint"),
        (None, "stopped"),
    ],
)
def test_finish_words(reason: FinishReason | None, word: str) -> None:
    assert api.finish_word(reason) == word


def test_cosine_matrix_and_nearest_neighbours() -> None:
    matrix = api.cosine_matrix([[1.0, 0.0], [2.0, 0.1], [0.0, 3.0], [0.0, 0.0]])
    assert [round(value, 4) for value in matrix[0]] == [1.0, 0.9988, 0.0, 0.0]
    assert all(matrix[i][j] == pytest.approx(matrix[j][i]) for i in range(4) for j in range(4))
    neighbours = api.nearest_neighbours(["a", "b", "c", "zero"], matrix)
    assert [(item.sentence, item.nearest) for item in neighbours[:3]] == [("a", "b"), ("b", "a"), ("c", "b")]
    assert api.nearest_neighbours(["alone"], [[1.0]]) == []


def test_sentences_are_the_non_empty_lines() -> None:
    assert api.sentences_of(" one \n\n  \ntwo\n") == ["one", "two"]


def stats(component: str, running: int, waiting: int, generated: int, ttft: float) -> ComponentStats:
    return ComponentStats(component, "", 1.0, 0, 0, running, waiting, 0, generated, 0, ttft, 99.0, 1.0, 0)


def test_history_sums_the_generators_and_keeps_the_last_samples() -> None:
    history = api.History(limit=3)
    assert history.add([stats("gateway", 9, 9, 900, 9.0)], at=0.0) is None
    for second in range(5):
        history.add(
            [
                stats("gateway", 1, 1, 0, 0.0),
                stats("generator", 2, 1, 100 + 10 * second, 0.2),
                stats("generator", 1, 0, 50 + 5 * second, 0.4),
            ],
            at=float(2 * second),
        )
    columns = history.columns()
    assert columns["time"] == [4.0, 6.0, 8.0]
    assert columns["running"] == [3.0] * 3 and columns["waiting"] == [1.0] * 3
    assert columns["tokens/s"] == [7.5] * 3, "15 tokens every 2 s"
    assert columns["TTFT (s)"] == [0.4] * 3

    records = charts.history_records(columns)
    assert records[0] == {
        "time": datetime.datetime.fromtimestamp(4.0),
        "tokens/s": 7.5,
        "TTFT (s)": 0.4,
        "running": 3.0,
        "waiting": 1.0,
    }


def test_history_rate_starts_at_zero_and_skips_a_restart() -> None:
    history = api.History()
    first = history.add([stats("generator", 0, 0, 500, 0.1)], at=10.0)
    restarted = history.add([stats("generator", 0, 0, 20, 0.1)], at=12.0)
    after = history.add([stats("generator", 0, 0, 60, 0.1)], at=14.0)
    assert first is not None and restarted is not None and after is not None
    assert (first.tokens_per_second, restarted.tokens_per_second, after.tokens_per_second) == (0.0, 0.0, 20.0)


def test_heatmap_has_one_cell_per_pair_and_the_title() -> None:
    spec = charts.similarity_heatmap(["a", "b" * 60], [[1.0, 0.25], [0.25, 1.0]]).to_dict()
    assert spec["title"] == "Cosine similarity"
    [values] = spec["datasets"].values()
    assert [(item["a"], item["b"], item["similarity"]) for item in values] == [
        ("1. a", "1. a", 1.0),
        ("1. a", "2. " + "b" * 39 + "…", 0.25),
        ("2. " + "b" * 39 + "…", "1. a", 0.25),
        ("2. " + "b" * 39 + "…", "2. " + "b" * 39 + "…", 1.0),
    ]


def test_neighbours_table() -> None:
    assert charts.neighbours_table([("a", "b", 0.123456)]) == [
        {"Sentence": "a", "Nearest neighbour": "b", "Cosine similarity": 0.1235}
    ]


def test_a_reply_cancels_its_stream_and_one_without_is_a_no_op() -> None:
    api.Reply().cancel()
    stream = FakeStream([], None)
    api.Reply(stream=stream).cancel()
    assert stream.cancelled


def test_rate_of_a_running_reply_counts_up_to_now() -> None:
    timing = api.Timing(started=0.0)
    now = time.monotonic()
    timing.token(now - 2.0)
    timing.token(now - 1.0)
    timing.token(now - 1.0)
    assert 0.9 < timing.tokens_per_second <= 1.0


# ---------------------------------------------------------------- predictions

CREATED = datetime.datetime(2026, 12, 4, 14, 0, 0, tzinfo=datetime.UTC)


def prediction(number: int, status: str = "starting", **changes: Any) -> Prediction:
    base = Prediction(
        id=f"p{number}",
        model="SmolLM2-135M-Instruct",
        version="",
        status=status,  # type: ignore[arg-type]
        input={"prompt": "Hi"},
        output=None,
        error="",
        logs="",
        created_at=CREATED + datetime.timedelta(seconds=number),
        started_at=None,
        completed_at=None,
        metrics=PredictionMetrics(),
        urls=PredictionUrls(),
        task="generate",
    )
    return dataclasses.replace(base, **changes)


class FakePredictions:
    """The predictions service as the tab sees it: records what it was asked, answers from a list
    (newest first), and refuses an input without "prompt" as the service words it."""

    def __init__(self, stored: list[Prediction]) -> None:
        self.stored = stored
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def create(
        self,
        model: str,
        input: Mapping[str, Any],
        *,
        webhook: str | None = None,
        timeout: float | None = None,
    ) -> Prediction:
        self.calls.append(("create", {"model": model, "input": dict(input), "webhook": webhook}))
        if "prompt" not in input:
            raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "input.prompt: is required")
        created = prediction(len(self.stored) + 1, input=dict(input), webhook=webhook or "")
        self.stored.insert(0, created)
        return created

    def get(self, prediction_id: str, *, timeout: float | None = None) -> Prediction:
        return next(item for item in self.stored if item.id == prediction_id)

    def list(
        self,
        *,
        status: str | None = None,
        cursor: str | None = None,
        page_size: int | None = None,
        timeout: float | None = None,
    ) -> PredictionPage:
        self.calls.append(("list", {"status": status, "page_size": page_size}))
        chosen = [item for item in self.stored if status is None or item.status == status]
        return PredictionPage(tuple(chosen[:page_size]), None, None)

    def cancel(self, prediction_id: str, *, timeout: float | None = None) -> Prediction:
        return self.get(prediction_id)


def test_the_typed_client_is_what_the_tab_calls() -> None:
    client: api.Predictions = PredictionsClient("127.0.0.1:1")
    assert callable(client.create)


def test_a_prompt_goes_with_the_sidebars_options_and_an_embedding_model_embeds_it() -> None:
    options = {"temperature": 0.0, "max_new_tokens": 8}
    assert api.prediction_input(api.PROMPT, "generation", "Paris is", "", options) == {
        "prompt": "Paris is",
        "parameters": {"temperature": 0.0, "max_new_tokens": 8},
    }
    assert api.prediction_input(api.PROMPT, "embedding", "A cat", "", options) == {"input": ["A cat"]}


def test_json_input_is_sent_as_written() -> None:
    text = '{"messages": [{"role": "user", "content": "Hi"}]}'
    given = api.prediction_input(api.JSON_INPUT, "generation", "ignored", text, {"max_new_tokens": 8})
    assert given == {"messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize(
    ("kind", "prompt", "text", "message"),
    [
        (api.PROMPT, "  ", "", "Prompt is empty"),
        (
            api.JSON_INPUT,
            "",
            '{"prompt": ',
            "Input (JSON) is not valid JSON: Expecting value at line 1 column 12",
        ),
        (api.JSON_INPUT, "", '["Hi"]', "Input (JSON) must be a JSON object, got list"),
    ],
)
def test_form_input_that_cannot_be_sent_names_the_control(
    kind: str, prompt: str, text: str, message: str
) -> None:
    with pytest.raises(api.FormError) as raised:
        api.prediction_input(kind, "generation", prompt, text, {})
    assert str(raised.value) == message


def test_the_json_example_follows_the_model_until_the_user_edits_it() -> None:
    chat = api.example_input("generation")
    assert '"messages"' in chat and '"input"' in api.example_input("embedding")
    assert api.example_input("unknown") == chat
    assert api.is_example_input(chat) and api.is_example_input(api.example_input("embedding"))
    assert api.is_example_input("  ")
    assert not api.is_example_input('{"prompt": "mine"}')


def test_create_sends_the_webhook_only_when_given_and_the_apis_error_names_the_field() -> None:
    fake = FakePredictions([])
    first = api.create_prediction(fake, "m", {"prompt": "Hi"}, webhook="  ")
    second = api.create_prediction(fake, "m", {"prompt": "Yo"}, webhook=" https://example.com/hook ")
    assert [call[1]["webhook"] for call in fake.calls] == [None, "https://example.com/hook"]
    assert (first.id, second.id, second.webhook) == ("p1", "p2", "https://example.com/hook")
    with pytest.raises(InvalidArgumentError) as raised:
        api.create_prediction(fake, "m", {"problem": "1+1"})
    assert api.error_text(raised.value) == "INVALID_ARGUMENT: input.prompt: is required"


def test_recent_predictions_filter_by_status_newest_first() -> None:
    fake = FakePredictions(
        [prediction(3, "processing"), prediction(2, "succeeded"), prediction(1, "succeeded")]
    )
    assert [item.id for item in api.recent_predictions(fake)] == ["p3", "p2", "p1"]
    assert [item.id for item in api.recent_predictions(fake, "succeeded", limit=1)] == ["p2"]
    assert fake.calls == [
        ("list", {"status": None, "page_size": api.RECENT_PREDICTIONS}),
        ("list", {"status": "succeeded", "page_size": 1}),
    ]


def test_table_rows_label_and_facts() -> None:
    done = prediction(
        7,
        "succeeded",
        version="2",
        started_at=CREATED + datetime.timedelta(seconds=8),
        completed_at=CREATED + datetime.timedelta(seconds=9),
        metrics=PredictionMetrics(
            predict_time=0.4856,
            total_time=2.0,
            input_token_count=6,
            output_token_count=8,
            time_to_first_token=0.04,
        ),
    )
    local = done.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    assert api.prediction_rows([done, prediction(1)]) == [
        {
            "ID": "p7",
            "Status": "succeeded",
            "Model": "SmolLM2-135M-Instruct",
            "Task": "generate",
            "Created": local,
            "Predict time (s)": 0.486,
        },
        {
            "ID": "p1",
            "Status": "starting",
            "Model": "SmolLM2-135M-Instruct",
            "Task": "generate",
            "Created": prediction(1).created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            "Predict time (s)": None,
        },
    ]
    assert api.prediction_label(done) == "p7 · succeeded · SmolLM2-135M-Instruct"
    facts = {row["Field"]: row["Value"] for row in api.prediction_facts(done)}
    assert facts == {
        "Status": "succeeded",
        "Model": "SmolLM2-135M-Instruct (version 2)",
        "Task": "generate",
        "Created": local,
        "Started": done.started_at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if done.started_at else "",
        "Completed": done.completed_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
        if done.completed_at
        else "",
        "Predict time": "0.486 s",
        "Total time": "2.000 s",
        "Time to first token": "0.040 s",
        "Input tokens": "6",
        "Output tokens": "8",
    }
    # What is not known yet is left out rather than shown empty.
    assert [row["Field"] for row in api.prediction_facts(prediction(1))] == [
        "Status",
        "Model",
        "Task",
        "Created",
    ]


@pytest.mark.parametrize(
    ("output", "text"),
    [
        (None, ""),
        ({"text": "Paris is the"}, "Paris is the"),
        ({"generated_text": " Paris.", "usage": {"prompt_tokens": 4}}, " Paris."),
        ({"message": {"role": "assistant", "content": "Hello!"}}, "Hello!"),
        ({"solution": "2 + 2 = 4. The answer is 4.", "answer": "4"}, "2 + 2 = 4. The answer is 4."),
        ({"data": [{"index": 0, "embedding": [0.1, 0.2]}], "dimensions": 2}, ""),
        ("plain", "plain"),
        ([1, 2], ""),
    ],
)
def test_output_text_of_every_task(output: Any, text: str) -> None:
    assert api.output_text(output) == text


class FakeWatched:
    """A prediction's text stream that records whether it was cancelled."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.cancelled = False

    def __iter__(self) -> Iterator[str]:
        yield from self.texts

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def summaries(self) -> dict[int, StreamSummary]:
        return {0: StreamSummary(0, "".join(self.texts), 2, 0.1, 20.0, FinishReason.LENGTH)}


def test_watch_fills_the_reply_and_cancels_however_it_ends() -> None:
    stream = FakeWatched(["Paris", "", " is"])
    reply = api.Reply()
    shown: list[str] = []
    api.watch(stream, reply, shown.append)
    assert shown == ["Paris", "Paris is"] and reply.text == "Paris is"
    assert not reply.stopped and reply.summary is not None and stream.cancelled

    stopped = FakeWatched(["one", " two", " three"])
    partial = api.Reply()

    def show(text: str) -> None:
        if text == "one two":
            raise Stopped

    with pytest.raises(Stopped):
        api.watch(stopped, partial, show)
    assert stopped.cancelled and partial.stopped and partial.text == "one two"
    partial.cancel()
