"""Streamed text and stop strings: `StopStringMatcher`, and `generate` with a tokenizer."""
import dataclasses

import numpy as np
import pytest

from infer_support import confident_dir_with_tokenizer, shared_engine
from rsdjax.infer.generate import generate
from rsdjax.infer.interface import SamplingParams
from rsdjax.infer.text import StopStringMatcher
from rsdjax.tokenizer import Tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. 日本語のテキストです。brown bread, 東京。"


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return Tokenizer.load(tiny_tokenizer_dir)


def stream(matcher, ids):
    pieces = [matcher.push(t) for t in ids]
    return pieces + [matcher.finish()]


def test_streamed_pieces_add_up_to_the_decoded_text(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT) // 4  # byte-level tokens: multi-byte characters span several ids
    pieces = stream(StopStringMatcher(tokenizer, prompt_ids=tokenizer.encode("Hello")), ids)
    assert "".join(pieces) == tokenizer.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)  # never half a character


@pytest.mark.parametrize("stop", [["brown"], ["テキスト"], ["dog.", "quick"], ["bread", "。b"], ["absent"], ["。"]])
def test_stop_strings_cut_the_text_and_never_leak(tokenizer, stop):
    ids = tokenizer.encode(TEXT)
    hits = [TEXT.find(s) for s in stop if s in TEXT]
    expected = TEXT[:min(hits)] if hits else TEXT
    matcher = StopStringMatcher(tokenizer, stop=stop)
    shown = ""
    for t in ids:
        shown += matcher.push(t)
        assert expected.startswith(shown)  # only final text, never a piece of a stop string
    shown += matcher.finish()
    assert shown == expected == matcher.text
    assert matcher.stopped == bool(hits)


def test_held_back_text_is_released_when_the_stop_string_does_not_complete(tokenizer):
    matcher = StopStringMatcher(tokenizer, stop=["brown cow"])
    shown = "".join(matcher.push(t) for t in tokenizer.encode("a brown"))
    assert shown == "a "  # "brown" could still become "brown cow"
    shown += "".join(matcher.push(t) for t in tokenizer.encode(" c"))
    assert shown == "a "
    shown += "".join(matcher.push(t) for t in tokenizer.encode("at"))
    assert shown == "a brown cat"  # no longer a stop string: released at once
    assert shown + matcher.finish() == "a brown cat" and not matcher.stopped


def test_generate_with_tokenizer_and_stop_strings(tmp_path_factory, tiny_tokenizer_dir):
    model_dir = confident_dir_with_tokenizer(tmp_path_factory, tiny_tokenizer_dir)
    engine, tokenizer = shared_engine(model_dir, max_slots=2, max_context=64)
    assert tokenizer is not None
    # EOS: the config's (2), then the tokenizer's end-of-text and end-of-turn tokens
    assert engine.eos_token_ids == [2, tokenizer.token_id("<|end_of_text|>"), tokenizer.token_id("<|eot_id|>")]
    prompt = tokenizer.encode("The quick brown", add_bos=True)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    (free,) = generate(engine, [prompt], params, tokenizer=tokenizer)
    assert free.text == tokenizer.decode(free.token_ids)
    # stop at a piece of the free-running text that starts after a few tokens
    cut = len(tokenizer.decode(free.token_ids[:4]))
    stop = free.text[cut:cut + 3]
    assert len(stop) == 3 and stop.strip()
    streamed = []
    (stopped,) = generate(engine, [prompt], dataclasses.replace(params, stop=[stop]), tokenizer=tokenizer,
                          on_text=lambda i, piece: streamed.append(piece))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[:free.text.find(stop)] == "".join(streamed)
    assert stopped.token_ids == free.token_ids[:len(stopped.token_ids)] and len(stopped.token_ids) < 24
    assert engine.free_slots() == [0, 1]
    np.testing.assert_array_equal(stopped.token_ids[:4], free.token_ids[:4])


def test_stop_strings_without_a_tokenizer_are_refused(tmp_path_factory, tiny_tokenizer_dir):
    model_dir = confident_dir_with_tokenizer(tmp_path_factory, tiny_tokenizer_dir)
    engine, _ = shared_engine(model_dir, max_slots=2, max_context=64)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        generate(engine, [[1, 2]], SamplingParams(stop=["x"]))
