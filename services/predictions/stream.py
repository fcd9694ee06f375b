"""The messages of a prediction's output stream (GenerateStreamResponse, as the gateway's own
streams send them): text deltas while it runs and the final message built from the task's whole
answer once it succeeded."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from inference.v1 import common_pb2, embedding_pb2, generation_pb2

from services.predictions.records import Prediction


def partial_text(prediction: Prediction) -> str:
    """The text produced so far ({"text": ...} while processing); "" when none."""
    output = prediction.output
    if isinstance(output, dict) and isinstance(output.get("text"), str):
        return str(output["text"])
    return ""


def text_delta(prediction_id: str, text: str) -> generation_pb2.GenerateStreamResponse:
    return generation_pb2.GenerateStreamResponse(request_id=prediction_id, token=common_pb2.Token(text=text))


def final_message(prediction: Prediction) -> generation_pb2.GenerateStreamResponse:
    """The last stream message of a prediction that succeeded, from its task's whole answer."""
    message = generation_pb2.GenerateStreamResponse(request_id=prediction.id)
    output = prediction.output if isinstance(prediction.output, dict) else {}
    kinds: dict[str, Any] = {
        "generate": generation_pb2.GenerateResponse,
        "chat": generation_pb2.ChatResponse,
        "math": generation_pb2.SolveMathResponse,
        "coding": generation_pb2.SolveCodingResponse,
        "embed": embedding_pb2.EmbedResponse,
    }
    try:
        answer = json_format.ParseDict(output, kinds[prediction.task](), ignore_unknown_fields=True)
    except json_format.ParseError:
        message.generated_text = partial_text(prediction)
        return message
    if isinstance(answer, embedding_pb2.EmbedResponse):
        message.usage.prompt_tokens = answer.usage.prompt_tokens
        message.usage.total_tokens = answer.usage.total_tokens
        return message
    message.finish_reason = answer.finish_reason
    message.usage.CopyFrom(answer.usage)
    message.tokens_generated = answer.tokens_generated
    message.generation_time = answer.generation_time
    if isinstance(answer, generation_pb2.GenerateResponse):
        message.generated_text = answer.generated_text
        message.tokens_per_second = answer.tokens_per_second
    elif isinstance(answer, generation_pb2.ChatResponse):
        message.generated_text = answer.message.content
        message.tokens_per_second = answer.tokens_per_second
    elif isinstance(answer, generation_pb2.SolveMathResponse):
        message.generated_text = answer.solution
        message.answer = answer.answer
    else:
        message.generated_text = answer.solution
        message.code = answer.code
        message.language = answer.language
    return message


class TextDiverged(Exception):
    """The prediction's text no longer continues what a stream already sent: a rerun (after its
    worker was lost) wrote different text."""


class TextFollower:
    """Turns successive snapshots of a prediction's text into deltas that always add up to a
    prefix of its current text. A snapshot behind what was sent (a rerun catching up) adds
    nothing; one that contradicts it raises TextDiverged, since sent text cannot be taken back."""

    def __init__(self) -> None:
        self.sent = ""

    def delta(self, text: str) -> str:
        """The text to send after `text` was seen ("" for none); raises TextDiverged."""
        if text.startswith(self.sent):
            piece = text[len(self.sent) :]
            self.sent = text
            return piece
        if self.sent.startswith(text):
            return ""
        raise TextDiverged
