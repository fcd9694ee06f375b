"""The playground's chart specs and tables from plain values (no Streamlit calls, no stack)."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import altair as alt

SIMILARITY_TITLE = "Cosine similarity"


def short(sentence: str, width: int = 40) -> str:
    return sentence if len(sentence) <= width else sentence[: width - 1] + "…"


def similarity_records(sentences: Sequence[str], matrix: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
    """One record per pair: the two sentences (numbered, so that repeated lines stay apart) and
    their similarity."""
    labels = [f"{i + 1}. {short(sentence)}" for i, sentence in enumerate(sentences)]
    return [
        {"a": labels[i], "b": labels[j], "similarity": round(value, 4)}
        for i, row in enumerate(matrix)
        for j, value in enumerate(row)
    ]


def similarity_heatmap(sentences: Sequence[str], matrix: Sequence[Sequence[float]]) -> alt.LayerChart:
    """A heatmap of the matrix with each cell's value written on it."""
    records = similarity_records(sentences, matrix)
    order = list(dict.fromkeys(record["a"] for record in records))
    base = alt.Chart({"values": records}).encode(
        x=alt.X("b:N", sort=order, title=None, axis=alt.Axis(labelAngle=-30, labelLimit=220)),
        y=alt.Y("a:N", sort=order, title=None, axis=alt.Axis(labelLimit=220)),
    )
    cells = base.mark_rect().encode(
        color=alt.Color("similarity:Q", scale=alt.Scale(domain=[-1, 1], scheme="redblue", reverse=True)),
        tooltip=["a:N", "b:N", "similarity:Q"],
    )
    text = base.mark_text().encode(text=alt.Text("similarity:Q", format=".2f"))
    return alt.LayerChart(layer=[cells, text], title=SIMILARITY_TITLE)


def neighbours_table(rows: Sequence[tuple[str, str, float]]) -> list[dict[str, Any]]:
    """Rows of (sentence, its nearest neighbour, their similarity) as table records."""
    return [
        {"Sentence": sentence, "Nearest neighbour": nearest, "Cosine similarity": round(value, 4)}
        for sentence, nearest, value in rows
    ]


def history_records(columns: dict[str, list[float]]) -> list[dict[str, Any]]:
    """The status samples (a "time" column of Unix seconds and one per figure) as records with a
    local datetime, for a line chart over time."""
    names = [name for name in columns if name != "time"]
    return [
        {"time": datetime.datetime.fromtimestamp(at), **{name: columns[name][i] for name in names}}
        for i, at in enumerate(columns["time"])
    ]
