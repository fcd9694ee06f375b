"""A well-typed use of the client: `mypy --strict` must accept it (tests/test_client_typing.py).

It is never run; it only has to type-check."""

from __future__ import annotations

from inference_client import (
    AsyncInferenceClient,
    ChatMessage,
    FieldViolation,
    FinishReason,
    GenerateOptions,
    InferenceClient,
    InvalidArgumentError,
    ResourceExhaustedError,
    RetryPolicy,
)


def sync_usage(address: str) -> str:
    retry = RetryPolicy(max_attempts=3)
    with InferenceClient(address, api_key="secret", timeout=30.0, retry=retry) as client:
        result = client.generate("What is the capital of France?", max_new_tokens=16, temperature=0.0, seed=1)
        text: str = result.text
        reason: FinishReason = result.finish_reason
        completion_tokens: int = result.usage.completion_tokens

        options: GenerateOptions = {"max_new_tokens": 8, "stop": ["\n"]}
        stream = client.stream("Tell me a story", timeout=10.0, **options)
        pieces = [token.text for token in stream]
        final: FinishReason | None = stream.finish_reason

        reply = client.chat([ChatMessage("system", "Be brief."), ("user", "Hi")], max_new_tokens=8)
        answer: str = reply.message.content
        chat_stream = client.chat_stream([("user", "Hi")], max_new_tokens=8, stop="\n")
        math = client.solve_math_stream("What is 2 + 2?", temperature=0.0)
        coding = client.solve_coding_stream("Add two numbers.", language="python", timeout=5.0)
        extracted: str | None = math.summaries[0].answer if math.summaries else None
        code: str | None = coding.summaries[0].code if coding.summaries else None
        print([token.text for token in chat_stream], extracted, code)

        vectors: list[list[float]] = client.embed(["a", "b"], dimensions=64, encoding_format="base64").vectors
        from_ids = client.embed([[101, 2023, 102]], normalize=False)

        try:
            client.generate("x", max_new_tokens=-1)
        except InvalidArgumentError as error:
            violations: list[FieldViolation] = error.field_violations
            print(error.code.name, error.message, [v.field for v in violations])
        except ResourceExhaustedError as error:
            delay: float | None = error.retry_delay
            print(delay)

        serving: bool = client.health(timeout=2.0).serving
        model_ids = [model.id for model in client.models()]
        generated = f"{text}{reason}{completion_tokens}{pieces}{final}{answer}"
        return f"{generated}{vectors}{from_ids}{serving}{model_ids}"


async def async_usage(address: str) -> str:
    async with AsyncInferenceClient(address, timeout=30.0) as client:
        result = await client.generate(messages=[("user", "Hi")], max_new_tokens=4)
        stream = client.stream("Count to three", max_new_tokens=8)
        tokens = [token.text async for token in stream]
        solved = client.solve_coding_stream("Sort a list.", max_new_tokens=8)
        tokens += [token.text async for token in solved]
        embedding = await client.embed("hello")
        health = await client.health()
        return f"{result.text}{tokens}{stream.usage}{embedding.vectors[0][0]}{health.status.value}"
