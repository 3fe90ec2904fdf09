"""Incremental detokenisation: the text of a request's generated ids, handed over piece by
piece as tokens arrive, without decoding the whole output again on every token.

Window: with ids t_0 .. t_n and offsets p <= r (r: the end of the text handed over, p: a few
tokens before it, so that decoders that depend on context, e.g. a leading-space rule, see the
same context twice), a new token hands over

    delta = decode(t_p .. t_n)[len(decode(t_p .. t_{r-1})):]

unless decode(t_p .. t_n) ends in U+FFFD (a multi-byte character whose remaining bytes come with
later tokens): then nothing, until the character is complete.  After a delta, p <- r and
r <- n + 1, so each token decodes O(window) ids.  The deltas joined equal decode(t_0 .. t_n) for
tokenizers whose decode concatenates the tokens' bytes (byte-level BPE, the byte tokenizer);
`flush` hands over the incomplete rest, as decode writes it.

Stop strings (`TextStream`): the text is searched for them where a new match can be, i.e. from
len(old text) - (longest stop string - 1); the first match ends the text before it.  Text that
might be the start of a stop string (a suffix of the text that is a proper prefix of one) is held
back until a later token decides, so what was handed over never has to be taken back: the
deltas joined equal the final text, the stop string excluded.
"""

from __future__ import annotations

from collections.abc import Sequence

from frontier_jax.data.tokenizer import Tokenizer

INCOMPLETE = "\ufffd"  # what decode writes for the bytes of an unfinished character


class IncrementalDecoder:
    """decode(ids) of a growing id sequence, as deltas (module docstring)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # p
        self.read = 0  # r

    def push(self, token: int) -> str:
        """Appends `token`; returns the text it completes ("" while a character is unfinished)."""
        self.ids.append(token)
        before, after = self._window()
        if len(after) <= len(before) or after.endswith(INCOMPLETE):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """The text of the tokens not handed over yet, unfinished characters as decode writes them."""
        before, after = self._window()
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]

    def _window(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return decode(self.ids[self.prefix : self.read]), decode(self.ids[self.prefix :])


class TextStream:
    """The generated text of one request, cut at its first stop string (module docstring)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = tuple(stop)
        self.longest = max(map(len, self.stop), default=0)
        self.text = ""  # decoded so far (complete characters), cut at a stop string
        self.sent = 0  # characters of text handed over
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        """Adds `token` -> (the text to hand over now, whether a stop string ended the text)."""
        new = self.decoder.push(token)
        start = max(len(self.text) - self.longest + 1, 0)
        self.text += new
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0] if new else []
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._take(len(self.text)), True
        return self._take(len(self.text) - self._held()), False

    def finish(self) -> str:
        """The rest of the text once the request ends (held-back and unfinished characters
        included unless a stop string ended it)."""
        if not self.stopped:
            self.text += self.decoder.flush()
        return self._take(len(self.text))

    def _held(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stop if len(s) > k):
                return k
        return 0

    def _take(self, end: int) -> str:
        delta, self.sent = self.text[self.sent : end], end
        return delta
