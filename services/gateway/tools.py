"""OpenAI function calling without a tool-aware model: the tools' description for the prompt, the
JSON Schema a forced call is constrained to, and the parsing of replies into tool calls (the
constrained shape, and Hermes-style <tool_call> blocks of chat templates). Pure Python, no I/O."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from services.common import sampling

NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_TOOLS = 128
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object"}
# The key of the arguments in a constrained call (as Llama 3.1's tool format names it). The grammar
# emits properties in the order of the schema's `required` list, so "name" comes first: the model
# picks the function before it writes the arguments.
ARGUMENTS_KEY = "parameters"
HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

Mode = Literal["none", "auto", "required", "function"]


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, description and JSON Schema of the arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None

    @property
    def schema(self) -> dict[str, Any]:
        """The arguments' schema, always of an object (absent or {} means any object)."""
        return {**EMPTY_PARAMETERS, **(self.parameters or {})}

    def openai(self) -> dict[str, Any]:
        """OpenAI's shape, as chat templates with a tool format read it."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.schema}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """tool_choice resolved: "function" names the one tool to call."""

    mode: Mode
    name: str = ""


@dataclass(frozen=True)
class ToolPlan:
    """How a chat request uses its tools: not at all, through the chat template (auto), or as a
    call forced by a JSON Schema constraint (required or a named function)."""

    tools: tuple[Tool, ...] = ()
    choice: ToolChoice = ToolChoice("none")

    @property
    def forced(self) -> bool:
        return bool(self.tools) and self.choice.mode in ("required", "function")

    @property
    def templated(self) -> bool:
        return bool(self.tools) and self.choice.mode == "auto"

    @property
    def callable(self) -> tuple[Tool, ...]:
        """The tools the reply may call."""
        if self.choice.mode == "function":
            return tuple(tool for tool in self.tools if tool.name == self.choice.name)
        return self.tools


NO_TOOLS = ToolPlan()


@dataclass(frozen=True)
class ToolCall:
    """One call of a reply; `arguments` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def tool_violations(tools: list[Any]) -> list[tuple[str, str]]:
    """(field, problem) of each malformed tool in OpenAI's JSON shape ("tools[i]..." paths)."""
    bad: list[tuple[str, str]] = []
    if len(tools) > MAX_TOOLS:
        bad.append(("tools", f"has {len(tools)} tools, more than the limit of {MAX_TOOLS}"))
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        field = f"tools[{index}]"
        if not isinstance(tool, dict):
            bad.append((field, "must be an object"))
            continue
        if tool.get("type") != "function":
            bad.append((f"{field}.type", f"must be 'function', got {tool.get('type')!r}"))
        function = tool.get("function")
        if not isinstance(function, dict):
            bad.append((f"{field}.function", "is required"))
            continue
        name = function.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            bad.append((f"{field}.function.name", f"must match ^[a-zA-Z0-9_-]{{1,64}}$, got {name!r}"))
        elif name in seen:
            bad.append((f"{field}.function.name", f"{name!r} is given twice; names must be unique"))
        else:
            seen.add(name)
        parameters = function.get("parameters")
        if parameters is not None and (
            not isinstance(parameters, dict) or parameters.get("type", "object") != "object"
        ):
            bad.append((f"{field}.function.parameters", 'must be a JSON Schema of "type": "object"'))
    return bad


def choice_of(value: Any, names: list[str]) -> ToolChoice | str:
    """tool_choice as sent (None when absent) resolved against the tools' names, or the problem."""
    if value is None:
        return ToolChoice("auto" if names else "none")
    if value in ("none", "auto", "required"):
        if value != "none" and not names:
            return f"{value!r} needs tools"
        return ToolChoice(value)
    if isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            return 'a named choice is {"type": "function", "function": {"name": ...}}'
        if name not in names:
            return f"names {name!r}, which is not among the tools ({', '.join(names) or 'none given'})"
        return ToolChoice("function", name)
    return 'must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'


def _rebased(schema: Any, base: str) -> Any:
    """`schema` with every local "$ref" ("#", "#/...") pointing into `base`, the JSON pointer
    where the schema now sits, so that a tool's own "$defs" still resolve inside the call schema."""
    if isinstance(schema, list):
        return [_rebased(item, base) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: _rebased(value, base) for key, value in schema.items()}
    ref = schema.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        result["$ref"] = "#" + base + ref[1:]
    return result


def _call_schema(tool: Tool, base: str) -> dict[str, Any]:
    arguments = _rebased(tool.schema, f"{base}/properties/{ARGUMENTS_KEY}")
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, ARGUMENTS_KEY: arguments},
        "required": ["name", ARGUMENTS_KEY],
        "additionalProperties": False,
    }


def call_schema(plan: ToolPlan) -> dict[str, Any]:
    """The JSON Schema of a forced reply: {"name": <a callable tool>, "parameters": <its
    arguments>}, one branch per tool."""
    if len(plan.callable) == 1:
        return _call_schema(plan.callable[0], "")
    return {"anyOf": [_call_schema(tool, f"/anyOf/{i}") for i, tool in enumerate(plan.callable)]}


def system_prompt(plan: ToolPlan) -> str:
    """The system message that describes the callable tools and the exact answer shape."""
    lines = ["You can call these functions:"]
    for tool in plan.callable:
        lines.append(f"- {tool.name}: {tool.description or '(no description)'}")
        lines.append(f"  arguments JSON Schema: {sampling.canonical_json(tool.schema)}")
    example = f'{{"name": "<function name>", "{ARGUMENTS_KEY}": {{<arguments>}}}}'
    if plan.choice.mode == "function":
        example = f'{{"name": "{plan.choice.name}", "{ARGUMENTS_KEY}": {{<arguments>}}}}'
    lines.append(f"Answer with one function call and nothing else, as JSON: {example}")
    return "\n".join(lines)


def call_text(name: str, arguments: str) -> str:
    """A call as the forced reply spells it, for an assistant turn of the history."""
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        parsed = arguments
    return json.dumps({"name": name, ARGUMENTS_KEY: parsed}, ensure_ascii=False)


def hermes_text(name: str, arguments: str) -> str:
    """A call as a Hermes-style template spells it, for an assistant turn of the history."""
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        parsed = arguments
    body = json.dumps({"name": name, "arguments": parsed}, ensure_ascii=False)
    return f"{HERMES_OPEN}\n{body}\n{HERMES_CLOSE}"


def _arguments(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def parse_forced(text: str, plan: ToolPlan) -> ToolCall | None:
    """The call of a constrained reply, or None when it is not one (cut short by max_tokens)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get(ARGUMENTS_KEY), dict):
        return None
    name = data.get("name")
    if name not in {tool.name for tool in plan.callable}:
        return None
    return ToolCall(new_call_id(), str(name), _arguments(data[ARGUMENTS_KEY]))


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    """The content and the calls of a reply with Hermes-style blocks
    (<tool_call>{"name": ..., "arguments": {...}}</tool_call>). A block that does not parse stays
    in the content; content without any call is the text as it is, and None when only calls."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    position = 0
    for match in _HERMES_BLOCK.finditer(text):
        call = _hermes_call(match.group(1))
        if call is None:
            continue
        kept.append(text[position : match.start()])
        position = match.end()
        calls.append(call)
    if not calls:
        return text, []
    kept.append(text[position:])
    content = "".join(kept).strip()
    return content or None, calls


def _hermes_call(body: str) -> ToolCall | None:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        # Some models write the arguments as a JSON string, as OpenAI's wire does.
        return ToolCall(new_call_id(), data["name"], arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), data["name"], _arguments(arguments))


class HermesSplitter:
    """Streams a templated reply's content and holds back what may be a <tool_call> block:
    feed() returns the text that is surely content; finish() parses what was held back."""

    def __init__(self) -> None:
        self._held = ""
        self._in_call = False

    def feed(self, text: str) -> str:
        self._held += text
        if self._in_call:
            return ""
        start = self._held.find(HERMES_OPEN)
        if start >= 0:
            self._in_call = True
            out, self._held = self._held[:start], self._held[start:]
            return out
        # Keep a tail that could be the start of the opening tag.
        keep = 0
        for size in range(min(len(HERMES_OPEN) - 1, len(self._held)), 0, -1):
            if HERMES_OPEN.startswith(self._held[-size:]):
                keep = size
                break
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content still to send and the calls of the held-back text."""
        held, self._held = self._held, ""
        content, calls = parse_hermes(held)
        return content or "", calls
