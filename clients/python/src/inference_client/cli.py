"""`inference-client`: stream a generation to the terminal, embed texts, check health.

inference-client generate "What is the capital of France?" --address localhost:50051 --max-new-tokens 32
inference-client embed "first text" "second text" --dimensions 128
inference-client health
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from inference_client.client import DEFAULT_TIMEOUT, InferenceClient
from inference_client.errors import InferenceError
from inference_client.options import GenerateOptions
from inference_client.types import EncodingFormat


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address",
        default=os.environ.get("INFERENCE_ADDRESS", "localhost:50051"),
        help="host:port of the gateway, generator or embedder (env INFERENCE_ADDRESS; default %(default)s)",
    )
    common.add_argument(
        "--api-key",
        default=os.environ.get("INFERENCE_API_KEY"),
        help="sent as 'authorization: Bearer <key>' (env INFERENCE_API_KEY)",
    )
    common.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="deadline in seconds (default %(default)s)"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(prog="inference-client", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate", parents=[common], help="stream a generation to the terminal as tokens arrive"
    )
    generate.add_argument("prompt")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    generate.add_argument("--max-new-tokens", type=int)
    generate.add_argument("--temperature", type=float)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--repetition-penalty", type=float)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append", help="a stop sequence (repeatable)")
    generate.add_argument("--model", default="")
    generate.add_argument(
        "--stats", action="store_true", help="print finish reason and token counts to stderr"
    )

    embed = commands.add_parser("embed", parents=[common], help="print embeddings as JSON")
    embed.add_argument("texts", nargs="+")
    embed.add_argument("--model", default="")
    embed.add_argument("--dimensions", type=int)
    embed.add_argument("--encoding-format", choices=["float", "base64"], default="float")
    embed.add_argument("--no-normalize", action="store_true")

    commands.add_parser("health", parents=[common], help="print the health of the tier as JSON")
    commands.add_parser("models", parents=[common], help="print the served models as JSON")
    return parser


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {item.name: _plain(getattr(value, item.name)) for item in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _generate(client: InferenceClient, args: argparse.Namespace) -> None:
    options: GenerateOptions = {"model": args.model}
    if args.max_new_tokens is not None:
        options["max_new_tokens"] = args.max_new_tokens
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.top_p is not None:
        options["top_p"] = args.top_p
    if args.top_k is not None:
        options["top_k"] = args.top_k
    if args.repetition_penalty is not None:
        options["repetition_penalty"] = args.repetition_penalty
    if args.seed is not None:
        options["seed"] = args.seed
    if args.stop:
        options["stop"] = list(args.stop)
    if args.chat:
        stream = client.stream(messages=[("user", args.prompt)], **options)
    else:
        stream = client.stream(args.prompt, **options)
    with stream:
        for token in stream:
            sys.stdout.write(token.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        usage = stream.usage
        summary = stream.summaries.get(0)
        reason = stream.finish_reason.value if stream.finish_reason else "unknown"
        line = f"finish_reason={reason}"
        if usage is not None:
            line += f" prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens}"
        if summary is not None:
            line += f" tokens_per_second={summary.tokens_per_second:.1f}"
        print(line, file=sys.stderr)


def _embed(client: InferenceClient, args: argparse.Namespace) -> None:
    encoding: EncodingFormat = "base64" if args.encoding_format == "base64" else "float"
    result = client.embed(
        list(args.texts),
        model=args.model,
        dimensions=args.dimensions,
        encoding_format=encoding,
        normalize=False if args.no_normalize else None,
    )
    print(json.dumps(_plain(result)))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with InferenceClient(args.address, api_key=args.api_key, timeout=args.timeout) as client:
            if args.command == "generate":
                _generate(client, args)
            elif args.command == "embed":
                _embed(client, args)
            elif args.command == "health":
                print(json.dumps(_plain(client.health()), indent=2))
            elif args.command == "models":
                print(json.dumps(_plain(client.models()), indent=2))
    except InferenceError as error:
        print(f"\nerror: {error}", file=sys.stderr)
        for violation in error.field_violations:
            print(f"  {violation.field}: {violation.description}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
