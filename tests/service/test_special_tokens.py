"""Trailing EOS/pad text: removed from the end of a response, nothing else touched."""

from __future__ import annotations

import pytest

from hero_service.config import Settings
from hero_service.special_tokens import TrailingTokenStripper, parse_token_list, stripper

strip = stripper()


@pytest.mark.parametrize("ending", [
    "<|im_end|>", "<|im_end|>\n<|endoftext|>", "<|endoftext|>" * 5, "</s>", "<|eot_id|>",
    "<|end_of_text|>", "<end_of_turn>\n", "<eos><pad><pad>", "<|end|>", "<｜end▁of▁sentence｜>",
    " <|im_end|>  \n"])
def test_trailing_special_token_text_goes(ending):
    assert strip("so the answer is \\boxed{42}" + ending) == "so the answer is \\boxed{42}"


def test_everything_else_stays():
    assert strip("no tokens here  \n") == "no tokens here  \n"  # unchanged, whitespace too
    assert strip("a</s>b") == "a</s>b"  # only the end of the response
    assert strip("<|im_end|>") == ""  # nothing but EOS: an empty response (no_answer)
    assert strip("x <|im_start|>") == "x <|im_start|>"  # not an end/pad text


def test_longest_text_wins():
    stripper_ = TrailingTokenStripper(["d|>", "<|end|>"])
    assert stripper_("abc<|end|>") == "abc"


def test_settings_turn_it_off_or_add_texts(monkeypatch):
    assert stripper(False)("42<|im_end|>") == "42<|im_end|>"
    assert parse_token_list(" <|my_eos|>, <my_pad> ,") == ("<|my_eos|>", "<my_pad>")
    monkeypatch.setenv("HERO_STRIP_SPECIAL_TOKENS", "false")
    monkeypatch.setenv("HERO_EXTRA_SPECIAL_TOKENS", "<|my_eos|>,<my_pad>")
    settings = Settings()
    assert settings.strip_special_tokens is False
    assert stripper(True, settings.extra_special_tokens)("42<my_pad><|my_eos|>") == "42"
