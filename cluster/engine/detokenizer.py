"""Detokenizer: one sequence's output text, built token by token, with its stop strings.

Decoding the whole output again at every step costs O(n) per token, O(n^2) per request; here
each token costs O(1) amortised. The decoding itself is `tokenizers`' DecodeStream (the
library's streaming decoder, which vLLM's fast path also uses): it decodes a short window of
recent tokens and releases their text only once it no longer ends in U+FFFD, so a character
whose UTF-8 bytes are split across tokens is sent whole, never as a replacement character.

Stop strings are searched in the text released since the last search plus the (longest stop
- 1) characters before it: an occurrence lying wholly in older text would have been found then.
A stop string found later cuts the text where it starts, which can be up to that many
characters back, so (unless the stop string is kept in the output) those characters are not
released to a stream until no stop string can begin in them."""

from collections.abc import Iterable

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.decoders import DecodeStream

from moefleet.cluster.sampling_params import SamplingParams


class Detokenizer:
    """Appended piece by piece, the text equals `tokenizer.decode(output_ids, skip_special_tokens)`
    once `flush()` ran, byte for byte; before that it is a prefix of it, less the bytes of an
    unfinished character. (This holds wherever that decode is prefix-stable: always for
    byte-level BPE; for byte fallback, unless the output holds invalid UTF-8, see
    _restart_stream.) `resumed_token_ids`: outputs a lost replica already produced, fed
    as that replica fed them, so what it released (and a client got) is released here too."""

    def __init__(self, tokenizer: BackendTokenizer, params: SamplingParams, resumed_token_ids: Iterable[int] = ()):
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        self._stops = params.stop_strings
        self._include_stop = params.include_stop_str_in_output
        self._search_back = max((len(stop) for stop in self._stops), default=1) - 1
        self._hold_back = 0 if self._include_stop else self._search_back
        self._parts: list[str] = []  # the text, joined only when asked for whole
        self.num_chars = 0
        self._num_searched = 0  # characters of text already searched for stop strings
        self._released_ids: list[int] = []  # the tokens of the last piece released: context for flush()
        self._held_ids: list[int] = []  # tokens whose text the stream still holds back
        for token_id in resumed_token_ids:
            self.add(token_id)

    @property
    def text(self) -> str:
        """All the text so far (joined once, then kept whole)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def add(self, token_id: int) -> None:
        """Decode the next output token; its text may wait for the tokens that complete it."""
        self._held_ids.append(token_id)
        try:
            piece = self._stream.step(self._tokenizer, token_id)
        except Exception as error:  # tokenizers raises a bare Exception
            if "Invalid prefix" not in str(error):
                raise
            piece = self._restart_stream()
        if piece is not None:
            self._released_ids, self._held_ids = self._held_ids, []
            self._append(piece)

    def _restart_stream(self) -> str | None:
        """The decoder changed text it had already released: a byte-fallback decoder (Llama,
        Mistral) turns a whole run of byte tokens into U+FFFD once the run stops being valid
        UTF-8, so a one-shot decode is not prefix-stable there. Released text cannot be taken
        back; as vLLM does, decoding starts afresh, here at the held tokens so none is lost.
        The text then reads as a decode from that point on; the deltas still add up to it."""
        self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
        self._released_ids = []
        return self._stream.step(self._tokenizer, self._held_ids)

    def flush(self) -> None:
        """The sequence ended: release what the stream holds back, as a one-shot decode reads it
        (a character left incomplete for good is U+FFFD there too). Decoded after the tokens of
        the last released piece, so a decoder that treats a leading token apart (a stripped
        leading space) reads the held tokens as it does mid-sequence."""
        if not self._held_ids:
            return
        context = self._decode(self._released_ids)
        self._append(self._decode(self._released_ids + self._held_ids)[len(context):])
        self._held_ids = []

    def find_stop(self) -> str | None:
        """The first of the stop strings (in the order given) that the text released since the
        last call completes; the text then ends where it starts, or after it when the stop
        string is kept in the output."""
        if self.num_chars == self._num_searched:
            return None
        window = self._last_chars(self.num_chars - max(0, self._num_searched - self._search_back))
        self._num_searched = self.num_chars
        for stop in self._stops:
            at = window.find(stop)
            if at >= 0:
                self._drop_last(len(window) - (at + len(stop) if self._include_stop else at))
                return stop
        return None

    def num_released(self, finished: bool) -> int:
        """How many characters of the text a stream may be sent by now: all once finished, else
        all but those a stop string found later could still cut."""
        return self.num_chars if finished else max(0, self.num_chars - self._hold_back)

    def text_between(self, start: int, end: int) -> str:
        """Characters [start, end) of the text, in time proportional to what lies after start."""
        return self._last_chars(self.num_chars - start)[: end - start]

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _append(self, piece: str) -> None:
        if piece:
            self._parts.append(piece)
            self.num_chars += len(piece)

    def _last_chars(self, count: int) -> str:
        pieces = []
        for part in reversed(self._parts):
            if count <= 0:
                break
            pieces.append(part[-count:])
            count -= len(part)
        return "".join(reversed(pieces))

    def _drop_last(self, count: int) -> None:
        self.num_chars -= count
        while count > 0:
            last = self._parts.pop()
            if len(last) > count:
                self._parts.append(last[:-count])
            count -= len(last)
