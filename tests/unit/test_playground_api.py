"""The playground's pure parts without a stack: settings from the environment, sampling options
from the form, timing captions, Stop cancelling a stream, similarity maths, the status history
and the chart records."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator

import grpc
import pytest
from inference_client import ComponentStats, FinishReason, InvalidArgumentError, StreamSummary, StreamToken

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
