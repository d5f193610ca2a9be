"""The incremental detokenizer against one-shot decoding, on every tiny architecture's tokenizer:
streamed deltas add up to `tokenizer.decode(output_ids)` byte for byte, never show U+FFFD for a
character a later token completes, stop strings end the text where a search of the whole
decoded output does, and a resumed sequence goes on without repeating or losing text."""

import random

import pytest

from moefleet import SamplingParams
from moefleet.cluster.engine.detokenizer import Detokenizer
from moefleet.cluster.engine.tokenizer import Tokenizer
from tests.conftest import ARCHS

MULTIBYTE_TEXTS = ["héllo 世界, 日本語のテキスト", "emoji 🙂👍🏽 and ZWJ 👩‍💻 end", "Ünïcödé ½ ∑ ≠ 漢字 😀"]
REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module", params=ARCHS)
def tokenizer(request, model_dir) -> Tokenizer:
    return Tokenizer(model_dir(request.param))


def split_character_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids whose bytes are only part of a UTF-8 character (they decode alone to U+FFFD)."""
    ids = [i for i in range(tokenizer.backend.get_vocab_size()) if REPLACEMENT in tokenizer.decode([i])]
    assert len(ids) >= 8, "the tokenizer has no ids that split a multi-byte character"
    return ids


def special_ids(tokenizer: Tokenizer) -> list[int]:
    return sorted(i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special)


def random_outputs(tokenizer: Tokenizer, count: int, seed: int) -> list[list[int]]:
    """Token sequences mixing ids that split characters, special ids, ordinary ids, and the ids of
    text with CJK and emoji, cut at random places."""
    rng = random.Random(seed)
    split, special = split_character_ids(tokenizer), special_ids(tokenizer)
    vocab = tokenizer.backend.get_vocab_size()
    texts = [tokenizer.encode(text) for text in MULTIBYTE_TEXTS]
    outputs = []
    for _ in range(count):
        ids = []
        while len(ids) < rng.randrange(1, 60):
            kind = rng.random()
            if kind < 0.3:
                ids.append(rng.choice(split))
            elif kind < 0.4:
                ids.append(rng.choice(special))
            elif kind < 0.7:
                ids.append(rng.randrange(vocab))
            else:
                text = rng.choice(texts)
                start = rng.randrange(len(text))
                ids.extend(text[start:start + rng.randrange(1, 12)])
        outputs.append(ids)
    return outputs


def stream(tokenizer: Tokenizer, ids: list[int], params: SamplingParams, resumed: int = 0):
    """Feed ids[resumed:] to a detokenizer (made with ids[:resumed] as resumed tokens) as the
    engine and AsyncEngine do. Returns (deltas, stop string, tokens taken, final text)."""
    detokenizer = Detokenizer(tokenizer.backend, params, ids[:resumed])
    sent, deltas, stop, taken = detokenizer.num_released(finished=False), [], None, resumed
    for token in ids[resumed:]:
        detokenizer.add(token)
        taken += 1
        stop = detokenizer.find_stop() if params.stop_strings else None
        finished = stop is not None or taken == len(ids)
        if finished and stop is None:
            detokenizer.flush()
        released = detokenizer.num_released(finished)
        deltas.append(detokenizer.text_between(sent, released))
        sent = released
        if finished:
            break
    return deltas, stop, taken, detokenizer.text


def stop_the_old_way(tokenizer: Tokenizer, ids: list[int], params: SamplingParams):
    """What the engine did before: decode the whole output after each token and search it."""
    for taken in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:taken], params.skip_special_tokens)
        for stop in params.stop_strings:
            at = text.find(stop)
            if at >= 0:
                return stop, taken, text[: at + len(stop)] if params.include_stop_str_in_output else text[:at]
    return None, len(ids), tokenizer.decode(ids, params.skip_special_tokens)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streamed_deltas_add_up_to_the_one_shot_decode(tokenizer, skip_special_tokens):
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    for ids in random_outputs(tokenizer, 200, seed=skip_special_tokens):
        expected = tokenizer.decode(ids, skip_special_tokens)
        deltas, _, _, text = stream(tokenizer, ids, params)
        assert "".join(deltas) == text == expected, ids
        streamed = ""
        for delta in deltas:  # every U+FFFD sent is one the final text has, at that place
            streamed += delta
            assert expected.startswith(streamed), ids


def test_characters_split_across_tokens_arrive_whole(tokenizer):
    for text in MULTIBYTE_TEXTS:
        ids = tokenizer.encode(text)
        assert any(REPLACEMENT in tokenizer.decode([i]) for i in ids), "the text splits no character"
        deltas, _, _, final = stream(tokenizer, ids, SamplingParams())
        assert final == tokenizer.decode(ids) and REPLACEMENT not in final
        assert not any(REPLACEMENT in delta for delta in deltas), deltas


def test_a_character_left_incomplete_ends_as_the_replacement_character(tokenizer):
    ids = tokenizer.encode("ok 世界")
    while not tokenizer.decode(ids).endswith(REPLACEMENT):
        ids.pop()
    detokenizer = Detokenizer(tokenizer.backend, SamplingParams(), ids)
    assert REPLACEMENT not in detokenizer.text  # held back while a later token could complete it
    detokenizer.flush()
    assert detokenizer.text == tokenizer.decode(ids) and detokenizer.text.endswith(REPLACEMENT)


def stops_across_token_boundaries(tokenizer: Tokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Substrings of the decoded output that straddle the text of two or more tokens."""
    ends = [len(tokenizer.decode(ids[:n])) for n in range(1, len(ids) + 1)]
    text, stops = tokenizer.decode(ids), []
    for end in ends[:-1]:
        start, stop_end = max(0, end - rng.randrange(1, 4)), end + rng.randrange(1, 4)
        if REPLACEMENT not in text[start:stop_end] and stop_end <= len(text):
            stops.append(text[start:stop_end])
    return stops


@pytest.mark.parametrize("include_stop_str_in_output", [False, True])
def test_stop_strings_end_the_text_where_a_whole_output_search_does(tokenizer, include_stop_str_in_output):
    rng = random.Random(7)
    cases = []
    for ids in random_outputs(tokenizer, 120, seed=3):
        found = stops_across_token_boundaries(tokenizer, ids, rng)
        if found:  # one stop, two (the later one in the list may occur first), or one never met
            cases += [(ids, [rng.choice(found)]), (ids, rng.sample(found, min(2, len(found)))), (ids, ["\x00never"])]
    for text in MULTIBYTE_TEXTS:  # multibyte stop strings, split across tokens
        ids = tokenizer.encode(text)
        cases += [(ids, ["界"]), (ids, ["👍🏽", "🙂"]), (ids, ["語のテ"]), (ids, ["💻 e", "漢"])]
    stopped = 0
    for ids, stops in cases:
        params = SamplingParams(stop=stops, include_stop_str_in_output=include_stop_str_in_output)
        deltas, stop, taken, text = stream(tokenizer, ids, params)
        assert (stop, taken, text) == stop_the_old_way(tokenizer, ids, params), (ids, stops)
        assert "".join(deltas) == text  # nothing streamed that the stop string later cut
        stopped += stop is not None
    assert stopped >= len(cases) // 2


@pytest.mark.parametrize("stops", [[], ["界"], ["e", "世界"]])
def test_a_resumed_sequence_goes_on_without_repeating_or_losing_text(tokenizer, stops):
    params = SamplingParams(stop=stops)
    for ids in random_outputs(tokenizer, 30, seed=11) + [tokenizer.encode(text) for text in MULTIBYTE_TEXTS]:
        deltas, stop, taken, text = stream(tokenizer, ids, params)
        for resumed in range(1, taken):  # a replica lost after `resumed` tokens, mid-character too
            delivered = "".join(deltas[:resumed])
            rest, resumed_stop, resumed_taken, resumed_text = stream(tokenizer, ids, params, resumed)
            assert delivered + "".join(rest) == "".join(deltas), (ids, resumed)
            assert (resumed_stop, resumed_taken, resumed_text) == (stop, taken, text)


def test_engine_stream_text_grows_to_the_decode_of_its_tokens(engines):
    llm = engines("qwen3_moe")
    tokenizer = llm.engine.tokenizer
    prompt = {"prompt_token_ids": tokenizer.encode(MULTIBYTE_TEXTS[0])}
    full = llm.generate(prompt, SamplingParams(temperature=1.0, seed=2, max_tokens=48, ignore_eos=True))[0].outputs[0]
    assert full.text == tokenizer.decode(full.token_ids)
    needle = full.text[len(full.text) // 2:][:3]
    params = SamplingParams(temperature=1.0, seed=2, max_tokens=48, ignore_eos=True, stop=[needle])
    texts = [out.outputs[0].text for out in llm.stream(prompt, params)]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    assert texts[-1] == full.text[: full.text.index(needle)]


def byte_fallback_tokenizer(model_dir) -> Tokenizer:
    """A Llama/Mistral-style tokenizer: characters outside the vocabulary become byte tokens
    (<0xE4>...), spaces are '▁', and the decoder strips the first leading space. Its decode is
    not prefix-stable: a run of byte tokens that turns invalid UTF-8 becomes U+FFFD as a whole."""
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as BackendTokenizer

    words = ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁the", "▁fox", "ll", "o"]
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *words])}
    backend = BackendTokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    backend.save(str(model_dir / "tokenizer.json"))
    return Tokenizer(str(model_dir))


def test_byte_fallback_text_streams_whole_characters_and_survives_invalid_bytes(tmp_path):
    tokenizer = byte_fallback_tokenizer(tmp_path)
    for text in MULTIBYTE_TEXTS:
        ids = tokenizer.backend.encode(text).ids
        deltas, _, _, final = stream(tokenizer, ids, SamplingParams())
        assert final == tokenizer.decode(ids) and not any(REPLACEMENT in delta for delta in deltas)
    ids = tokenizer.backend.encode("ok 世").ids[:-1]  # ends one byte short: flushed after the space it follows
    assert stream(tokenizer, ids, SamplingParams())[3] == tokenizer.decode(ids) == "ok " + REPLACEMENT * 2
    # A run of byte tokens that turns invalid after part of it was released ("x"): the one-shot
    # decode rewrites the whole run as U+FFFD; the stream keeps "x" and starts afresh at the
    # tokens it still held, none lost, instead of failing.
    byte = {b: tokenizer.backend.token_to_id(f"<0x{b:02X}>") for b in (0x78, 0xE4, 0x41)}
    ids = [byte[0x78], byte[0xE4], byte[0x41], tokenizer.backend.token_to_id("▁the")]
    assert tokenizer.decode(ids) == REPLACEMENT * 3 + " the"
    assert stream(tokenizer, ids, SamplingParams())[3] == "x" + REPLACEMENT * 2 + " the"
    rng, vocab = random.Random(5), tokenizer.backend.get_vocab_size()
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        deltas, _, _, final = stream(tokenizer, ids, SamplingParams(skip_special_tokens=rng.random() < 0.5))
        assert "".join(deltas) == final, ids
