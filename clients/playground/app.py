"""The playground: chat, math, coding, embeddings, predictions and the stack's status in the
browser, on the typed client over gRPC to the gateway (and to the predictions service). Run from
the repository root: `python -m streamlit run clients/playground/app.py`; settings come from
PLAYGROUND_* variables."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass

# Streamlit puts this file's folder on sys.path, so the modules beside it import by their names.
import api
import charts
import streamlit as st
from inference_client import (
    CancelledError,
    ChatOptions,
    InferenceClient,
    InferenceError,
    Model,
    Prediction,
    PredictionsClient,
    TokenStream,
)

# Seconds a status, model or cache call may take: the page must not hang on a dead address. (A
# comment, not a docstring: Streamlit's magic would write a bare string onto the page.)
INFO_TIMEOUT = 5.0
STREAM_TIMEOUT = 600.0
STREAMING = "streaming_reply"


def cancel_abandoned() -> None:
    """A new full run means the previous one was stopped or is being stopped (Streamlit's fast
    reruns start the new run at once): cancel the reply it was streaming without waiting for its
    next token, so a call still queued or thinking is freed too."""
    reply: api.Reply | None = st.session_state.pop(STREAMING, None)
    if reply is not None:
        reply.cancel()


@st.cache_resource(show_spinner=False)
def client_for(address: str, api_key: str) -> InferenceClient:
    """One channel per (address, key), shared by every browser session."""
    return api.connect(address, api_key)


@st.cache_resource(show_spinner=False)
def predictions_client_for(address: str, api_key: str) -> PredictionsClient:
    return api.connect_predictions(address, api_key)


@st.cache_data(ttl=30, show_spinner=False)
def served_models(address: str, api_key: str) -> list[Model]:
    return client_for(address, api_key).models(timeout=INFO_TIMEOUT)


def embedding_models(address: str, api_key: str) -> list[Model]:
    return [model for model in served_models(address, api_key) if model.task == "embedding"]


@st.cache_data(ttl=15, show_spinner=False)
def predictions_answer(address: str) -> bool:
    return api.answers_health(address)


@dataclass(frozen=True)
class Connection:
    address: str
    api_key: str
    predictions_address: str = api.DEFAULT_PREDICTIONS_ADDRESS

    @property
    def client(self) -> InferenceClient:
        return client_for(self.address, self.api_key)

    @property
    def predictions(self) -> PredictionsClient:
        return predictions_client_for(self.predictions_address, self.api_key)


def show_error(error: InferenceError) -> None:
    st.error(api.error_text(error))


def stream_reply(
    start: Callable[[], TokenStream], reply: api.Reply, stop_key: str, cursor: str = " ▌"
) -> None:
    """Streams into a placeholder with a Stop button beside it. Pressing Stop starts a new run of
    the script, which cancels the call at once (`cancel_abandoned`), and this run gets Streamlit's
    stop exception at its next element update; `api.follow` cancels in its `finally` too, so the
    generator frees the slot either way. Raises the API's InferenceError."""
    text = st.empty()
    stop = st.empty()
    st.session_state[STREAMING] = reply
    try:
        stop.button("Stop", key=stop_key)
        api.follow(start(), reply, lambda so_far: text.markdown(so_far + cursor))
    finally:
        # Only ours: the run that Stop started may already stream a reply of its own.
        if st.session_state.get(STREAMING) is reply:
            del st.session_state[STREAMING]
    text.empty()
    stop.empty()


# ---------------------------------------------------------------- sidebar


@dataclass(frozen=True)
class Form:
    """The sidebar's sampling controls."""

    system_prompt: str
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: str
    stop: str

    def options(self) -> ChatOptions | None:
        """The sampling options, or None after showing why the form cannot be sent."""
        try:
            return api.sampling_options(
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                max_tokens=self.max_tokens,
                seed=self.seed,
                stop=self.stop,
            )
        except api.FormError as error:
            st.error(str(error))
            return None


def sidebar(settings: api.Settings) -> tuple[Connection, Form]:
    with st.sidebar:
        st.header("Connection")
        address = st.text_input("Gateway address", value=settings.gateway_address, key="gateway_address")
        api_key = st.text_input("API key", value=settings.api_key, type="password", key="api_key")
        st.header("Sampling")
        form = Form(
            system_prompt=st.text_area("System prompt", value="", key="system_prompt"),
            temperature=st.slider("Temperature", 0.0, 2.0, 0.7, 0.05, key="temperature"),
            top_p=st.slider("Top-p", 0.05, 1.0, 1.0, 0.05, key="top_p"),
            top_k=int(st.number_input("Top-k", min_value=0, value=0, step=1, key="top_k", help="0 = off")),
            max_tokens=int(st.number_input("Max tokens", min_value=1, value=256, step=1, key="max_tokens")),
            seed=st.text_input("Seed", value="", key="seed", help="empty = none"),
            stop=st.text_input("Stop sequences", value="", key="stop", help="comma-separated"),
        )
    return Connection(address.strip(), api_key.strip(), settings.predictions_address), form


# ---------------------------------------------------------------- chat


def chat_tab(connection: Connection, form: Form) -> None:
    turns: list[api.Turn] = st.session_state.setdefault("chat", [])
    st.button("Clear conversation", key="chat_clear", on_click=turns.clear)
    history = st.container()
    prompt = st.chat_input("Ask the model", key="chat_input")
    with history:
        for turn in turns:
            with st.chat_message(turn.role):
                st.markdown(turn.content)
                if turn.reply is not None:
                    st.caption(turn.reply.caption)
        if not prompt:
            return
        options = form.options()
        if options is None:
            return
        messages = api.conversation(form.system_prompt, [*turns, api.Turn("user", prompt)])
        # The turns go into the session before streaming: with Streamlit's fast reruns the run
        # that Stop starts renders the conversation while this one is still being stopped.
        reply = api.Reply()
        asked = [api.Turn("user", prompt), api.Turn("assistant", reply=reply)]
        turns.extend(asked)
        with st.chat_message("user"):
            st.markdown(prompt)
        with st.chat_message("assistant"):
            try:
                stream_reply(
                    lambda: connection.client.chat_stream(messages, timeout=STREAM_TIMEOUT, **options),
                    reply,
                    "chat_stop",
                )
            except InferenceError as error:
                if not reply.text and not isinstance(error, CancelledError):
                    # A prompt the API refused is not kept.
                    for turn in asked:
                        turns.remove(turn)
                show_error(error)
                return
            st.markdown(reply.text)
            st.caption(reply.caption)


# ---------------------------------------------------------------- math and coding


def solve_tab(kind: str, examples: dict[str, str], connection: Connection, form: Form) -> None:
    problem_key, example_key, result_key = f"{kind}_problem", f"{kind}_example", f"{kind}_result"

    def pick() -> None:
        st.session_state[problem_key] = examples[st.session_state[example_key]]

    name = st.selectbox("Example problem", list(examples), key=example_key, on_change=pick)
    if problem_key not in st.session_state:
        st.session_state[problem_key] = examples[name]
    problem = st.text_area("Problem", key=problem_key, height=100)
    if st.button("Solve", key=f"{kind}_solve", type="primary") and problem.strip():
        options = form.options()
        if options is not None:
            reply = api.Reply()
            # In the session before streaming, as in Chat: the run that Stop starts shows it.
            st.session_state[result_key] = reply
            client = connection.client

            def start() -> TokenStream:
                if kind == "math":
                    return client.solve_math_stream(problem, timeout=STREAM_TIMEOUT, **options)
                return client.solve_coding_stream(problem, timeout=STREAM_TIMEOUT, **options)

            try:
                stream_reply(start, reply, f"{kind}_stop")
            except InferenceError as error:
                show_error(error)
    result: api.Reply | None = st.session_state.get(result_key)
    if result is None or not result.text:
        return
    summary = result.summary
    if result.stopped:
        st.info("Stopped before the end: no answer or code was extracted.")
    elif kind == "math":
        if summary is not None and summary.answer:
            st.metric("Answer", summary.answer)
        else:
            st.warning("No answer was found in the text.")
    elif summary is not None and summary.code:
        st.code(summary.code, language=summary.language or "python")
    else:
        st.warning("No code was found in the text.")
    with st.expander("Full text"):
        st.markdown(result.text)
    st.caption(result.caption)


# ---------------------------------------------------------------- embeddings


def embeddings_tab(connection: Connection) -> None:
    try:
        models = embedding_models(connection.address, connection.api_key)
    except InferenceError as error:
        show_error(error)
        return
    text = st.text_area("Sentences (one per line)", value=api.EXAMPLE_SENTENCES, key="embed_sentences")
    model = st.selectbox("Model", [item.id for item in models], key="embed_model")
    if st.button("Embed", key="embed_run", type="primary"):
        sentences = api.sentences_of(text)
        if len(sentences) < 2:
            st.warning("Enter at least two sentences, one per line.")
        else:
            try:
                result = connection.client.embed(sentences, model=model or "", timeout=60)
            except InferenceError as error:
                show_error(error)
            else:
                matrix = api.cosine_matrix(result.vectors)
                st.session_state["embed_result"] = {
                    "sentences": sentences,
                    "matrix": matrix,
                    "model": result.model,
                    "dimensions": result.dimensions,
                    "neighbours": api.nearest_neighbours(sentences, matrix),
                }
    shown = st.session_state.get("embed_result")
    if shown is not None:
        st.caption(f"{shown['model']} · {shown['dimensions']} dimensions")
        st.altair_chart(charts.similarity_heatmap(shown["sentences"], shown["matrix"]))
        st.subheader("Nearest neighbours")
        rows = [(item.sentence, item.nearest, item.similarity) for item in shown["neighbours"]]
        st.dataframe(charts.neighbours_table(rows), hide_index=True)
    cache_status(connection)


def cache_status(connection: Connection) -> None:
    st.subheader("Embedder cache")
    try:
        status = connection.client.cache_status(timeout=INFO_TIMEOUT)
    except InferenceError as error:
        show_error(error)
        return
    budget = f" of {status.memory_budget_mib:.0f} MiB" if status.memory_budget_mib else ""
    st.caption(
        f"{len(status.models)} loaded · {status.memory_used_mib:.0f} MiB used{budget} · "
        f"strategy {status.strategy} · {status.evictions} evictions"
        + (f" · loading: {', '.join(status.loading)}" if status.loading else "")
    )
    if status.models:
        st.dataframe(
            [
                {
                    "Model": item.name,
                    "Memory (MiB)": round(item.size_mib, 1),
                    "Device": item.device,
                    "Dimensions": item.dimensions,
                    "Hits": item.hits,
                }
                for item in status.models
            ],
            hide_index=True,
        )


# ---------------------------------------------------------------- predictions

PREDICTION_MODEL = "prediction_model"
PREDICTION_JSON = "prediction_json"
PREDICTION_SELECTED = "prediction_selected"
PREDICTION_WATCH = "prediction_watch"
PREDICTION_CANCEL_ERROR = "prediction_cancel_error"
PREDICTION_CREATED = "prediction_created"


def predictions_tab(connection: Connection, form: Form) -> None:
    client = connection.predictions
    st.subheader("New prediction")
    create_prediction(connection, client, form)
    notice = st.empty()
    st.subheader("Recent predictions")
    left, right = st.columns([4, 1], vertical_alignment="bottom")
    status = left.selectbox(
        "Status filter", [api.ALL_STATUSES, *api.PREDICTION_STATUSES], key="predictions_status"
    )
    # A click reruns the script, which lists again: the button needs no handler.
    right.button("Refresh", key="predictions_refresh")
    try:
        recent = api.recent_predictions(client, status, timeout=INFO_TIMEOUT)
    except InferenceError as error:
        show_error(error)
        return
    known = {item.id: item for item in recent}
    created: str | None = st.session_state.get(PREDICTION_CREATED)
    if created is not None:
        # The last one created, with its status as now listed (none when the filter hides it).
        listed = f": {known[created].status}" if created in known else ""
        notice.success(f"Created {created}{listed}")
    if recent:
        st.dataframe(api.prediction_rows(recent), hide_index=True)
    else:
        st.caption("No predictions with this status yet.")
    selected = st.session_state.get(PREDICTION_SELECTED)
    ids = list(known)
    if selected and selected not in known:
        # Just created, or filtered out: still the one to show.
        ids.insert(0, selected)
    if not ids:
        return
    picked = st.selectbox(
        "Prediction",
        ids,
        key=PREDICTION_SELECTED,
        format_func=lambda item: api.prediction_label(known[item]) if item in known else item,
    )
    prediction_details(client, picked)


def create_prediction(connection: Connection, client: PredictionsClient, form: Form) -> None:
    try:
        models = served_models(connection.address, connection.api_key)
    except InferenceError as error:
        show_error(error)
        return
    tasks = {item.id: item.task for item in models}

    def model_changed() -> None:
        # A new model gets its task's example, unless the JSON area holds the user's own input.
        if api.is_example_input(st.session_state.get(PREDICTION_JSON, "")):
            st.session_state[PREDICTION_JSON] = api.example_input(
                tasks.get(st.session_state[PREDICTION_MODEL], "")
            )

    model = st.selectbox("Model", list(tasks), key=PREDICTION_MODEL, on_change=model_changed)
    model_task = tasks.get(model or "", "generation")
    st.session_state.setdefault(PREDICTION_JSON, api.example_input(model_task))
    st.session_state.setdefault("prediction_prompt", "The capital of France is")
    kind = st.radio("Input", api.INPUT_KINDS, horizontal=True, key="prediction_kind")
    if kind == api.PROMPT:
        prompt = st.text_area("Prompt", key="prediction_prompt", height=100)
        json_text = ""
        if model_task != "embedding":
            st.caption("Sent with the sidebar's sampling controls as `parameters`.")
    else:
        prompt = ""
        json_text = st.text_area("Input (JSON)", key=PREDICTION_JSON, height=180)
        st.caption("The task's request without `model` and `stream`, sent as written.")
    webhook = st.text_input("Webhook URL (optional)", key="prediction_webhook")
    if not st.button("Create", key="prediction_create", type="primary") or not model:
        return
    options: ChatOptions | None = {}
    if kind == api.PROMPT and model_task != "embedding":
        options = form.options()
    if options is None:
        return
    try:
        given = api.prediction_input(kind, model_task, prompt, json_text, options)
    except api.FormError as error:
        st.error(str(error))
        return
    try:
        created = api.create_prediction(client, model, given, webhook, timeout=INFO_TIMEOUT * 2)
    except InferenceError as error:
        show_error(error)
        return
    # Set before the picker below is drawn in this run, so it shows (and watches) the new one.
    st.session_state[PREDICTION_SELECTED] = created.id
    st.session_state[PREDICTION_WATCH] = created.id
    st.session_state[PREDICTION_CREATED] = created.id


def prediction_details(client: PredictionsClient, prediction_id: str) -> None:
    """The prediction's status, output, error, logs, metrics and times; while it runs, a Cancel
    button and (after Create or Watch) its output streamed until it ends."""
    try:
        prediction = client.get(prediction_id, timeout=INFO_TIMEOUT)
    except InferenceError as error:
        show_error(error)
        return
    cancel_error = st.session_state.pop(PREDICTION_CANCEL_ERROR, None)
    if cancel_error:
        st.error(cancel_error)
    status = st.container(key="prediction_status").empty()
    status.markdown(f"**Status:** `{prediction.status}`")
    if not prediction.done:
        prediction = running_prediction(client, prediction)
        status.markdown(f"**Status:** `{prediction.status}`")
        if prediction.done:
            # It ended while watched: once more from the top, so the table and picker say so too.
            st.rerun()
    if prediction.error:
        st.error(f"Error: {prediction.error}")
    text = api.output_text(prediction.output)
    with st.container(key="prediction_output"):
        if text:
            st.code(text, language=None, wrap_lines=True)
        elif prediction.output is not None:
            st.json(prediction.output, expanded=False)
    if text and prediction.output is not None:
        with st.expander("Output JSON"):
            st.json(prediction.output, expanded=False)
    st.dataframe(api.prediction_facts(prediction), hide_index=True, height="content")
    with st.expander("Input"):
        st.json(prediction.input)
    if prediction.logs:
        with st.expander("Logs"):
            st.code(prediction.logs, language=None)


def running_prediction(client: PredictionsClient, prediction: Prediction) -> Prediction:
    """Cancel (and Watch or Stop watching) for a prediction that has not ended; while watched,
    its text streams here until it ends. Returns the prediction as it is afterwards."""

    def cancel() -> None:
        try:
            client.cancel(prediction.id, timeout=INFO_TIMEOUT)
        except InferenceError as error:
            st.session_state[PREDICTION_CANCEL_ERROR] = api.error_text(error)

    def watch() -> None:
        st.session_state[PREDICTION_WATCH] = prediction.id

    def stop_watching() -> None:
        st.session_state.pop(PREDICTION_WATCH, None)

    watching = st.session_state.get(PREDICTION_WATCH) == prediction.id
    buttons = st.empty()
    with buttons.container(horizontal=True):
        st.button("Cancel", key="prediction_cancel", on_click=cancel)
        if watching:
            st.button("Stop watching", key="prediction_stop", on_click=stop_watching)
        else:
            st.button("Watch", key="prediction_watch_button", on_click=watch)
    if not watching:
        return prediction
    reply = api.Reply()
    shown = st.empty()
    st.session_state[STREAMING] = reply
    try:
        api.watch(
            client.stream(prediction.id, timeout=STREAM_TIMEOUT),
            reply,
            lambda so_far: shown.markdown(so_far + " ▌"),
        )
    except InferenceError:
        # A failed prediction ends its stream with its error, which the details show.
        pass
    finally:
        if st.session_state.get(STREAMING) is reply:
            del st.session_state[STREAMING]
    st.session_state.pop(PREDICTION_WATCH, None)
    shown.empty()
    try:
        prediction = client.get(prediction.id, timeout=INFO_TIMEOUT)
    except InferenceError as error:
        show_error(error)
    if prediction.done:
        buttons.empty()
    return prediction


# ---------------------------------------------------------------- status


def status_panel(address: str, api_key: str) -> None:
    """Health, figures and charts; run as a fragment that Streamlit reruns every refresh."""
    client = client_for(address, api_key)
    try:
        health = client.health(timeout=INFO_TIMEOUT)
        stats = client.stats(timeout=INFO_TIMEOUT)
    except InferenceError as error:
        show_error(error)
        return
    history: api.History = st.session_state.setdefault("status_history", api.History())
    history.add(stats)
    overall = "SERVING" if health.serving else "NOT SERVING"
    st.subheader(f"Health: {overall}")
    st.dataframe(
        [
            {
                "Tier": item.component,
                "Status": item.status.name,
                "Address": item.address,
                "Device": " ".join(part for part in (item.device.type, item.device.name) if part),
                "Memory (MiB)": round(item.memory.process_rss_mib),
                "GPU memory (MiB)": round(item.memory.gpu_allocated_mib),
                "Models": ", ".join(item.models),
                "Uptime": str(datetime.timedelta(seconds=round(item.uptime_seconds))),
                "Message": item.message,
            }
            for item in health.components
        ],
        hide_index=True,
    )
    st.subheader("Stats")
    for item in stats:
        st.markdown(f"**{item.component}** `{item.address}`")
        first, second, third, fourth, fifth = st.columns(5)
        first.metric("Requests", item.requests_total)
        second.metric("Failed", item.requests_failed)
        third.metric("Running / waiting", f"{item.requests_running} / {item.requests_waiting}")
        if item.component == "generator":
            fourth.metric("Tokens/s", f"{item.mean_tokens_per_second:.1f}")
            fifth.metric("TTFT", f"{item.mean_time_to_first_token_seconds:.2f} s")
        elif item.component == "embedder":
            fourth.metric("Inputs embedded", item.embedded_inputs_total)
            fifth.metric("Cache hits", item.cache_hits)
        else:
            fourth.metric("Cache hits", item.cache_hits)
            fifth.metric("Uptime", str(datetime.timedelta(seconds=round(item.uptime_seconds))))
    if history.samples:
        st.subheader("Last minutes")
        records = charts.history_records(history.columns())
        left, right = st.columns(2)
        with left:
            st.caption("Tokens/s")
            st.line_chart(records, x="time", y="tokens/s")
            st.caption("Running and waiting requests")
            st.line_chart(records, x="time", y=["running", "waiting"])
        with right:
            st.caption("Time to first token (s)")
            st.line_chart(records, x="time", y="TTFT (s)")


# ---------------------------------------------------------------- page


def main() -> None:
    st.set_page_config(page_title="Inference playground", layout="wide")
    try:
        settings = api.Settings.from_env()
    except ValueError as error:
        st.error(str(error))
        return
    cancel_abandoned()
    st.title("Inference playground")
    connection, form = sidebar(settings)
    names = ["Chat", "Math", "Coding", "Embeddings"]
    with_predictions = predictions_answer(settings.predictions_address)
    if with_predictions:
        names.append("Predictions")
    names.append("Status")
    tabs = dict(zip(names, st.tabs(names), strict=True))
    with tabs["Chat"]:
        chat_tab(connection, form)
    with tabs["Math"]:
        solve_tab("math", api.EXAMPLE_MATH, connection, form)
    with tabs["Coding"]:
        solve_tab("coding", api.EXAMPLE_CODING, connection, form)
    with tabs["Embeddings"]:
        embeddings_tab(connection)
    if with_predictions:
        with tabs["Predictions"]:
            predictions_tab(connection, form)
    with tabs["Status"]:
        st.fragment(status_panel, run_every=settings.refresh_seconds)(connection.address, connection.api_key)


main()
