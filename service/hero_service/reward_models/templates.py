"""Prompts that arrive already rendered with the *policy's* chat template.

OpenRLHF with ``--data.apply_chat_template`` sends ``prompts`` rendered by the policy's tokenizer
(``<|im_start|>system ... <|im_start|>assistant\\n``) and ``query`` = prompt + response. Wrapping
such a prompt in a user message and rendering it again with the RM's template would show the RM a
conversation it was never trained on (two templates nested). The rule, applied wherever the
service meets a string prompt on its way to a reward model:

1. **Known format, ends with the assistant's generation prompt** → parsed back into chat messages
   (system / user / assistant turns) and re-rendered with the RM's *own* template, since the RM
   was trained on its own format. What the policy's template wrote after the generation header
   (a prefill such as ``<think>\\n`` or an empty think block) is template boilerplate, not the
   policy's output, and is dropped; so is the "Cutting Knowledge Date / Today Date" preamble that
   Llama-3.1-style templates write into the system turn themselves. Formats: ChatML (Qwen, Yi,
   LFM2, Nemotron; Phi-4's ``<|im_sep|>`` variant), Llama-3 and Llama-4 headers, Gemma 1-3
   (``<start_of_turn>``) and Gemma 4 (``<|turn>``), Phi-3 / Zephyr (``<|user|>``), GLM-4,
   DeepSeek V2.5/V3/R1 (``<｜User｜>``), Cohere (``<|START_OF_TURN_TOKEN|>``), Mistral / Llama-2
   (``[INST]``, ``<<SYS>>``, ``[SYSTEM_PROMPT]``).
2. **Rendered, but not parseable** (an unknown or malformed format, a role the schema has no
   name for such as ``tool``, or no trailing generation prompt) → the text is scored *verbatim*:
   prompt + response, no template on top, as OpenRLHF's own ``serve_rm.py`` scores ``query``.
3. **Plain text** (no template markers) → a user message, as before.

Never template twice. The embedded RM compares only the response's tail with the reference and is
untouched by any of this."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

Message = dict[str, str]

_STANDARD_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class ParsedChat:
    """A rendered conversation read back. ``messages``: the closed turns. ``open_role`` is the
    role of a trailing turn whose header was written but not closed (the generation prompt),
    ``open_text`` what follows that header, and ``open_at`` where that header starts in the
    text (None / "" / -1 when every turn is closed)."""

    format: str
    messages: list[Message]
    open_role: Optional[str]
    open_text: str
    open_at: int

    @property
    def awaits_assistant(self) -> bool:
        return self.open_role == "assistant"


@dataclass(frozen=True)
class _HeaderFormat:
    """A format whose turns are ``<header naming the role>content<end marker><separator>``."""

    name: str
    header: re.Pattern[str]  # group "role"
    ends: tuple[str, ...]  # turn terminators; () = a turn ends where the next header starts
    separator: str = ""  # written after a terminator
    preambles: tuple[str, ...] = ()  # BOS-like texts allowed before the first header
    roles: Optional[Mapping[str, str]] = None  # the format's role names -> ours
    ends_optional: bool = False  # some turns (DeepSeek's user turns) have no terminator
    leading_system: bool = False  # text before the first header is the system prompt (DeepSeek)
    preamble_required: bool = False  # headers too generic to trust without the format's BOS

    def role(self, name: str) -> Optional[str]:
        return (self.roles or _STANDARD_ROLES).get(name)


_FORMATS: tuple[_HeaderFormat, ...] = (
    _HeaderFormat(
        "chatml", re.compile(r"<\|im_start\|>(?P<role>[A-Za-z_]+)(?:\n|<\|im_sep\|>)"),
        ends=("<|im_end|>",), separator="\n", preambles=("<|startoftext|>",)),
    _HeaderFormat(
        "llama3", re.compile(r"<\|start_header_id\|>(?P<role>[A-Za-z_]+)<\|end_header_id\|>\n\n"),
        ends=("<|eot_id|>", "<|eom_id|>"), preambles=("<|begin_of_text|>",)),
    _HeaderFormat(
        "llama4", re.compile(r"<\|header_start\|>(?P<role>[A-Za-z_]+)<\|header_end\|>\n\n"),
        ends=("<|eot|>",), preambles=("<|begin_of_text|>",)),
    _HeaderFormat(
        "gemma", re.compile(r"<start_of_turn>(?P<role>[A-Za-z_]+)\n"),
        ends=("<end_of_turn>",), separator="\n", preambles=("<bos>",),
        roles={"system": "system", "user": "user", "model": "assistant"}),
    _HeaderFormat(
        "gemma4", re.compile(r"<\|turn>(?P<role>[A-Za-z_]+)\n"),
        ends=("<turn|>",), separator="\n", preambles=("<bos>",),
        roles={"system": "system", "user": "user", "model": "assistant"}),
    _HeaderFormat(
        "phi3", re.compile(r"<\|(?P<role>system|user|assistant)\|>\n"),
        ends=("<|end|>", "</s>"), separator="\n", preambles=("<s>",)),
    _HeaderFormat(
        "glm4", re.compile(r"<\|(?P<role>system|user|assistant|observation)\|>\n?"),
        ends=(), preambles=("[gMASK]<sop>",), preamble_required=True),
    _HeaderFormat(
        "deepseek", re.compile(r"<｜(?P<role>User|Assistant)｜>"),
        ends=("<｜end▁of▁sentence｜>",), preambles=("<｜begin▁of▁sentence｜>",),
        roles={"User": "user", "Assistant": "assistant"}, ends_optional=True,
        leading_system=True),
    _HeaderFormat(
        "cohere", re.compile(r"<\|START_OF_TURN_TOKEN\|><\|(?P<role>SYSTEM|USER|CHATBOT)_TOKEN\|>"),
        ends=("<|END_OF_TURN_TOKEN|>",), preambles=("<BOS_TOKEN>",),
        roles={"SYSTEM": "system", "USER": "user", "CHATBOT": "assistant"}),
)

# Texts that only a chat template writes. One of them anywhere (or a BOS text at the very start)
# marks a prompt as rendered even when no parser above can read it.
_MARKERS: tuple[str, ...] = (
    "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|eot_id|>", "<|header_start|>",
    "<start_of_turn>", "<end_of_turn>", "<|turn>", "<turn|>", "<|user|>", "<|assistant|>",
    "<|system|>", "[gMASK]", "<｜User｜>", "<｜Assistant｜>", "<|START_OF_TURN_TOKEN|>",
    "[INST]", "[/INST]", "<<SYS>>", "[SYSTEM_PROMPT]", "<|start|>", "<|message|>",
    "<end_of_utterance>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>",
)
_LEADING_MARKERS: tuple[str, ...] = ("<s>", "<bos>", "<BOS_TOKEN>")

# Written into the system turn by the Llama-3.1/3.2 templates themselves (and again when the RM's
# own Llama template renders the parsed messages), so it is not part of the prompt's content.
_LLAMA_DATE_PREAMBLE = re.compile(
    r"\A(?:Environment: ipython\n)?Cutting Knowledge Date: [^\n]*\nToday Date: [^\n]*\n\n")


def looks_rendered(text: str) -> bool:
    """Does ``text`` carry a chat template's markers?"""
    return text.startswith(_LEADING_MARKERS) or any(m in text for m in _MARKERS)


def _strip_preamble(text: str, preambles: Sequence[str]) -> tuple[str, int]:
    for preamble in preambles:
        if text.startswith(preamble):
            return text[len(preamble):], len(preamble)
    return text, 0


def _parse_headers(fmt: _HeaderFormat, text: str) -> Optional[ParsedChat]:
    body, offset = _strip_preamble(text, fmt.preambles)
    if fmt.preamble_required and not offset:
        return None
    headers = list(fmt.header.finditer(body))
    if not headers:
        return None
    messages: list[Message] = []
    leading = body[:headers[0].start()]
    if fmt.leading_system:
        if leading:
            messages.append({"role": "system", "content": leading})
    elif leading.strip():
        return None  # text before the first turn: not this format
    open_role, open_text, open_at = None, "", -1
    for i, header in enumerate(headers):
        role = fmt.role(header.group("role"))
        if role is None:
            return None  # tool / ipython / observation turns: no name for them in the schema
        last = i + 1 == len(headers)
        chunk = body[header.end():headers[i + 1].start() if not last else len(body)]
        content = _closed_content(fmt, chunk)
        if content is None:
            if not last and fmt.ends and not fmt.ends_optional:
                return None  # a turn that never ended before the next began: malformed
            if not last:
                content = chunk
            else:
                open_role, open_text, open_at = role, chunk, offset + header.start()
                break
        messages.append({"role": role, "content": content})
    return ParsedChat(fmt.name, messages, open_role, open_text, open_at)


def _closed_content(fmt: _HeaderFormat, chunk: str) -> Optional[str]:
    """The content of a turn chunk that ends with its terminator (and separator), else None."""
    for end in fmt.ends:
        for tail in (end + fmt.separator, end) if fmt.separator else (end,):
            if chunk.endswith(tail):
                return chunk[: -len(tail)]
    return None


_INST = re.compile(r"\[INST\]|\[/INST\]|</s>")
_LLAMA2_SYS = re.compile(r"\A\s*<<SYS>>\n(?P<system>.*?)\n<</SYS>>\n\n", re.S)


def _parse_inst(text: str) -> Optional[ParsedChat]:
    """Mistral / Llama-2: ``<s>[INST] user [/INST] assistant</s>[INST] user [/INST]``."""
    body, offset = _strip_preamble(text, ("<s>",))
    messages: list[Message] = []
    if body.startswith("[SYSTEM_PROMPT]"):
        end = body.find("[/SYSTEM_PROMPT]")
        if end < 0:
            return None
        messages.append({"role": "system", "content": body[len("[SYSTEM_PROMPT]"):end]})
        offset += end + len("[/SYSTEM_PROMPT]")
        body = body[end + len("[/SYSTEM_PROMPT]"):]
    sys_match = _LLAMA2_SYS.match(body)  # LLaVA-Mistral writes <<SYS>> before the first [INST]
    if sys_match and not messages:
        messages.append({"role": "system", "content": sys_match.group("system")})
        offset += sys_match.end()
        body = body[sys_match.end():]
    pieces = _INST.split(body)
    tags = _INST.findall(body)
    if not tags or tags[0] != "[INST]" or pieces[0].strip():
        return None
    expected = "[INST]"
    open_role, open_at = None, -1
    position = len(pieces[0])
    for i, tag in enumerate(tags):
        text_after = pieces[i + 1]
        if tag != expected:
            return None
        if tag == "[INST]":
            user = text_after.strip()
            sys_match = _LLAMA2_SYS.match(text_after) if not messages else None
            if sys_match:
                messages.append({"role": "system", "content": sys_match.group("system")})
                user = text_after[sys_match.end():].strip()
            messages.append({"role": "user", "content": user})
            expected = "[/INST]"
        elif tag == "[/INST]":
            reply = text_after
            if i + 1 == len(tags):  # nothing closes it: the generation prompt
                open_role, open_at = "assistant", offset + position
                return ParsedChat("inst", messages, open_role, reply, open_at)
            messages.append({"role": "assistant", "content": reply.strip()})
            expected = "</s>"
        else:  # </s>, possibly followed by the next turn's <s>
            if i + 1 < len(tags) and text_after.strip() not in ("", "<s>"):
                return None
            expected = "[INST]"
        position += len(tag) + len(text_after)
    if pieces[-1].strip() and expected == "[INST]":
        return None
    return ParsedChat("inst", messages, open_role, "", open_at)


def parse_chat(text: str) -> Optional[ParsedChat]:
    """Read a rendered conversation back, or None if ``text`` is in no format known here."""
    for fmt in _FORMATS:
        parsed = _parse_headers(fmt, text)
        if parsed is not None:
            return _tidy(parsed)
    parsed = _parse_inst(text)
    return _tidy(parsed) if parsed is not None else None


def _tidy(parsed: ParsedChat) -> ParsedChat:
    if parsed.format != "llama3" or not parsed.messages:
        return parsed
    first = parsed.messages[0]
    if first["role"] != "system" or not _LLAMA_DATE_PREAMBLE.match(first["content"]):
        return parsed
    rest = _LLAMA_DATE_PREAMBLE.sub("", first["content"], count=1)
    messages = ([{"role": "system", "content": rest}] if rest else []) + parsed.messages[1:]
    return ParsedChat(parsed.format, messages, parsed.open_role, parsed.open_text, parsed.open_at)


def prompt_messages(prompt: str) -> Optional[list[Message]]:
    """Rule 1: the chat messages of a rendered prompt that ends with the assistant's generation
    prompt, ready for the RM's own template; None for anything else (plain or unparseable)."""
    if not looks_rendered(prompt):
        return None
    parsed = parse_chat(prompt)
    if parsed is None or not parsed.awaits_assistant or not parsed.messages:
        return None
    if not any(m["role"] == "user" for m in parsed.messages):
        return None
    return parsed.messages


def generation_anchor(prompt: str, fallback_chars: int = 32) -> str:
    """The end of ``prompt`` that any decoding of it must still contain: from the generation
    header of a rendered prompt on (``<|im_start|>assistant\\n``), else its last characters.
    Used to find where the response starts in a query that does not begin with its prompt."""
    parsed = parse_chat(prompt) if looks_rendered(prompt) else None
    if parsed is not None and parsed.open_at >= 0:
        return prompt[parsed.open_at:]
    return prompt[-fallback_chars:]
