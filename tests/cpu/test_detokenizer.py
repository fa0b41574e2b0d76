"""Incremental detokenization, stop strings and finish reasons, with a real byte-level BPE."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from replica.detokenizer import IncrementalDetokenizer, OutputStream, StopChecker
from replica.sampling_params import SamplingParams

CORPUS = [
    "naïve café 東京 🙂 hello world",
    "The quick brown fox jumps over the lazy dog. STOP here.",
    "東京は日本の首都です。京都も有名です。",
    "Ünïcödé: ñ ü é ß 🙂🙃🚀 café crème brûlée",
    "Hello, world! Numbers 12345 and symbols #$%&.",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    # Small vocab: multi-byte characters are often split across tokens (e.g. "東" + its last byte).
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=340,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


def _decode(tok: PreTrainedTokenizerFast, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _encode(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _stream(tok, prompt: list[int], ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt)
    return [detok.add(i) for i in ids] + [detok.flush()]


def test_tokenizer_splits_characters(tokenizer) -> None:
    # The fixture must exercise the hard case: some single tokens decode to a partial character.
    pieces = [_decode(tokenizer, [i]) for i in _encode(tokenizer, "東京 🙂 ß 🚀 brûlée")]
    assert any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("text", CORPUS + ["東京🙂🙃 naïve", "🚀🚀🚀", "plain ascii"])
def test_stream_matches_full_decode_without_replacement_chars(tokenizer, text: str) -> None:
    ids = _encode(tokenizer, text)
    for prompt in ([], _encode(tokenizer, "Prompt: café 東京 ")):
        deltas = _stream(tokenizer, prompt, ids)
        assert "".join(deltas) == text
        assert all("\ufffd" not in d for d in deltas)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_sequences_concatenate_to_full_decode(tokenizer, data) -> None:
    vocab = len(tokenizer)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=40), label="ids")
    prompt = data.draw(st.sampled_from([[], _encode(tokenizer, "naïve café "), [0]]))
    detok = IncrementalDetokenizer(tokenizer, prompt)
    full = _decode(tokenizer, ids)
    emitted = ""
    for i in ids:
        emitted += detok.add(i)
        # Emitted text is never taken back.
        assert full.startswith(emitted)
        if "\ufffd" not in full:
            assert "\ufffd" not in emitted
    emitted += detok.flush()
    assert emitted == full == detok.text
    assert detok.token_ids == ids


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet="aé東京🙂 .xyz", max_size=30))
def test_random_text_round_trips_without_replacement(tokenizer, text: str) -> None:
    deltas = _stream(tokenizer, [], _encode(tokenizer, text))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_special_tokens_skipped_or_kept(tokenizer) -> None:
    eos = tokenizer.eos_token_id
    ids = _encode(tokenizer, "hello") + [eos] + _encode(tokenizer, " world")
    assert "".join(_stream(tokenizer, [], ids)) == "hello world"
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    assert "".join(detok.add(i) for i in ids) == "hello<eos> world"


def test_prompt_context_is_not_emitted(tokenizer) -> None:
    prompt = _encode(tokenizer, "The quick brown fox jumps over")
    ids = _encode(tokenizer, " the lazy dog.")
    assert "".join(_stream(tokenizer, prompt, ids)) == " the lazy dog."


@pytest.fixture(scope="module")
def sentencepiece() -> PreTrainedTokenizerFast:
    """Llama-style: "▁" for spaces, one leading space stripped, bytes for characters not in the
    vocabulary (byte fallback: "€" and "😀" become 3 and 4 byte tokens)."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    trained.train_from_iterator(
        CORPUS * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"])
    )
    vocab, merges = trained.get_vocab(), json.loads(trained.to_str())["model"]["merges"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    bpe = Tokenizer(
        models.BPE(vocab, [tuple(m) for m in merges], unk_token="<unk>", byte_fallback=True)
    )
    bpe.add_special_tokens(["<unk>", "</s>"])
    bpe.normalizer = trained.normalizer
    bpe.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_leading_space_comes_from_the_prompt(sentencepiece) -> None:
    world = _encode(sentencepiece, "world")  # "▁world": its space shows only after other text
    assert "".join(_stream(sentencepiece, [], world)) == "world"
    assert "".join(_stream(sentencepiece, _encode(sentencepiece, "Hello"), world)) == " world"


def test_byte_fallback_characters_split_across_tokens(sentencepiece) -> None:
    text = "café € 😀 東京 €€"
    ids = _encode(sentencepiece, text)
    pieces = sentencepiece.convert_ids_to_tokens(ids)
    assert pieces.count("<0xE2>") == 3 and pieces.count("<0xF0>") == 1  # "€" x 3, "😀"
    for prompt in ([], _encode(sentencepiece, "naïve")):
        deltas = _stream(sentencepiece, prompt, ids)
        assert "".join(deltas) == (text if not prompt else " " + text)
        assert all("\ufffd" not in d for d in deltas)


def test_a_prompt_ending_inside_a_character_is_not_output(tokenizer) -> None:
    # A token-id prompt can end inside a character; the generated tokens complete it. Those bytes
    # are the prompt's: the output is the generated tokens' own text (U+FFFD for the orphan bytes).
    ids = _encode(tokenizer, "東京 🙂 ß 🚀 brûlée")
    k = next(k for k in range(1, len(ids)) if _decode(tokenizer, ids[:k]).endswith("\ufffd"))
    prompt = _encode(tokenizer, "Prompt: ") + ids[:k]
    deltas = _stream(tokenizer, prompt, ids[k:])
    assert "".join(deltas) == _decode(tokenizer, ids[k:])
    assert "Prompt" not in "".join(deltas)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_prompt_context_is_left_out_of_the_output(tokenizer, data) -> None:
    vocab = len(tokenizer)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=20), label="ids")
    prompt = data.draw(st.lists(st.integers(0, vocab - 1), max_size=8), label="prompt")
    assert "".join(_stream(tokenizer, prompt, ids)) == _decode(tokenizer, ids)


def test_a_decoder_that_rewrites_across_tokens_does_not_stop_the_stream() -> None:
    # "a" is out when "b" turns it into "X": the stream goes on from the held tokens without
    # taking back what it emitted (DecodeStream alone raises "Invalid prefix" here).
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "c": 2, "?": 3}, unk_token="?"))
    tok.decoder = decoders.Sequence([decoders.Fuse(), decoders.Replace("ab", "X")])
    detok = IncrementalDetokenizer(PreTrainedTokenizerFast(tokenizer_object=tok), [])
    assert [detok.add(i) for i in (0, 1, 2, 2)] + [detok.flush()] == ["a", "", "bc", "c", ""]


# --- StopChecker ----------------------------------------------------------------------------------


def _feed_all(checker: StopChecker, deltas: list[str]) -> list[str]:
    return [checker.feed(d) for d in deltas]


def test_stop_string_truncates_and_is_excluded() -> None:
    checker = StopChecker(stop=["STOP"])
    out = _feed_all(checker, ["Hello ", "world. ST", "OP here"])
    assert out == ["Hello ", "world. ", ""]
    assert checker.text == "Hello world. "
    assert (checker.finish_reason, checker.stop_reason) == ("stop", "STOP")
    assert checker.feed("more") == "" and checker.finish("length") == ""


def test_hold_back_released_when_prefix_breaks() -> None:
    checker = StopChecker(stop=["cde"])
    assert checker.feed("ab") == "ab"
    assert checker.feed("c") == ""
    assert checker.feed("d") == ""
    assert checker.feed("x") == "cdx"
    assert checker.feed("cdc") == "cd"  # the last "c" may start "cde"; "cdc" cannot
    assert checker.feed("dq") == "cdq"
    assert not checker.finished
    assert checker.feed("zc") == "z"
    assert checker.finish("length") == "c"
    assert checker.text == "abcdxcdcdqzc" and checker.finish_reason == "length"


def test_earliest_stop_string_wins() -> None:
    checker = StopChecker(stop=["world", "lo w", "o"])
    assert checker.feed("hello world") == "hel"
    assert checker.stop_reason == "lo w"
    tie = StopChecker(stop=["ab", "abc"])
    tie.feed("xxabcd")
    assert tie.text == "xx" and tie.stop_reason == "abc"


def test_stop_in_single_delta_and_at_start() -> None:
    checker = StopChecker(stop=["\n\n"])
    assert checker.feed("\n\nrest") == ""
    assert checker.text == "" and checker.finish_reason == "stop"


def test_no_stop_strings_streams_everything() -> None:
    checker = StopChecker()
    assert _feed_all(checker, ["a", "b"]) == ["a", "b"]
    assert checker.finish("length") == "" and checker.text == "ab"


def test_stop_tokens_and_eos() -> None:
    checker = StopChecker(stop_token_ids=[7], eos_token_ids=[2])
    assert checker.token_stops(7) and checker.token_stops(2) and not checker.token_stops(3)
    assert not StopChecker(eos_token_ids=[2], ignore_eos=True).token_stops(2)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc東", max_size=30),
    stops=st.lists(st.text(alphabet="abc東", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_stop_checker_matches_reference(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    # Reference: generation stops after the first delta that completes a stop string; the output is
    # cut at the earliest stop string present at that point.
    expected, hits = text, []
    for end in bounds[1:]:
        hits = [text[:end].find(s) for s in stops if s in text[:end]]
        if hits:
            expected = text[: min(hits)]
            break
    checker = StopChecker(stop=stops)
    streamed = seen = ""
    for d in deltas:
        seen += d
        streamed += checker.feed(d)
        # Streamed text is never retracted, so no part of the stop string is ever streamed.
        assert expected.startswith(streamed)
        if not checker.finished:
            # Only a tail that could still grow into a stop string is held back.
            held = seen[len(streamed) :]
            assert not held or any(s.startswith(held) and len(held) < len(s) for s in stops)
    streamed += checker.finish("length")
    assert streamed == checker.text == expected
    assert checker.finish_reason == ("stop" if hits else "length")


# --- OutputStream (detokenizer + stop checker + limits) -------------------------------------------


def _run_stream(tok, params: SamplingParams, ids: list[int], eos: list[int] | None = None):
    stream = OutputStream(tok, _encode(tok, "Q: "), params, eos_token_ids=eos or [])
    deltas = []
    for i in ids:
        d = stream.add(i)
        deltas.append(d.text)
        if d.finish_reason is not None:
            break
    return stream, deltas


def test_stream_stop_string_across_multibyte_tokens(tokenizer) -> None:
    ids = _encode(tokenizer, "naïve café 東京 🙂 hello")
    stream, deltas = _run_stream(tokenizer, SamplingParams(stop="東京", max_tokens=100), ids)
    assert stream.text == "".join(deltas) == "naïve café "
    assert (stream.finish_reason, stream.stop_reason) == ("stop", "東京")
    assert all("東" not in d and "\ufffd" not in d for d in deltas)
    assert len(stream.token_ids) < len(ids)  # stopped as soon as the string completed


def test_stream_hold_back_across_tokens(tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog. STOP here."
    ids = _encode(tokenizer, text)
    params = SamplingParams(stop=["dog!", "STOP!"], max_tokens=len(ids))
    stream, deltas = _run_stream(tokenizer, params, ids)
    # No stop string occurs: everything comes out, and the run ends on length.
    assert "".join(deltas) == stream.text == text and stream.finish_reason == "length"
    held = []
    for k in range(len(ids)):
        seen = _decode(tokenizer, ids[: k + 1])
        streamed = "".join(deltas[: k + 1])
        if seen.endswith(("dog", "STOP")):
            held.append(seen[len(streamed) :])
    # "dog" and "STOP" were held back until the next character showed they were not stop strings.
    assert held == ["dog", "STOP"]


def test_stream_eos_and_stop_token(tokenizer) -> None:
    eos = tokenizer.eos_token_id
    ids = _encode(tokenizer, "hello world") + [eos] + _encode(tokenizer, "ignored")
    stream, _ = _run_stream(tokenizer, SamplingParams(max_tokens=100), ids, eos=[eos])
    assert stream.text == "hello world"
    assert (stream.finish_reason, stream.stop_reason) == ("stop", None)
    with pytest.raises(RuntimeError):
        stream.add(5)

    # ignore_eos: EOS is just another (skipped) token.
    params = SamplingParams(max_tokens=len(ids), ignore_eos=True)
    stream, _ = _run_stream(tokenizer, params, ids, eos=[eos])
    assert stream.text == "hello worldignored" and stream.finish_reason == "length"

    # A stop token id ends the stream and its text is not output.
    world = _encode(tokenizer, " world")[0]
    params = SamplingParams(max_tokens=100, stop_token_ids=[world])
    stream, _ = _run_stream(tokenizer, params, _encode(tokenizer, "hello world"))
    assert stream.text == "hello"
    assert (stream.finish_reason, stream.stop_reason) == ("stop", world)


def test_stream_length_flushes_held_text(tokenizer) -> None:
    ids = _encode(tokenizer, "abc STOP")
    n = len(ids)
    stream, deltas = _run_stream(tokenizer, SamplingParams(max_tokens=n, stop="STOPPED"), ids)
    assert stream.finish_reason == "length" and stream.stop_reason is None
    assert "".join(deltas) == stream.text == "abc STOP"
    assert len(stream.token_ids) == n

    # Finishing on length mid-character flushes what the tokens decode to (with U+FFFD).
    ids = _encode(tokenizer, "Ünïcödé 🚀 東京")
    partial = next(k for k in range(1, len(ids)) if _decode(tokenizer, ids[:k]).endswith("\ufffd"))
    stream, deltas = _run_stream(tokenizer, SamplingParams(max_tokens=partial), ids)
    assert stream.text == _decode(tokenizer, ids[:partial])
    assert stream.finish_reason == "length"
