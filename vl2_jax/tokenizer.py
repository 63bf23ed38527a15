"""DeepSeek-VL2's tokenizer: ``tokenizer.json`` through the `tokenizers` library, without transformers.

The official processor (transformers 4.38) wraps the same file in ``LlamaTokenizerFast``, which hands
encoding and decoding to a `tokenizers.Tokenizer` built from it; this module builds that object directly
and adds the special tokens the way the official code does (bos, eos, unk and pad where the file lacks
them, then the processor's image, grounding and role tokens). It gives the same ids and text, and
loading it imports neither transformers nor torch (seconds, where torch is installed).
``tests/test_tokenizer.py`` compares it with transformers' fast tokenizer, set up as transformers 4.38's
``LlamaTokenizerFast`` and the official processor set theirs up, on every fixture and on edited files.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

from vl2_jax.errors import ConfigError, one_line, read_json_object

# transformers' `clean_up_tokenization`, applied on decode where tokenizer_config.json asks for it
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _token_text(value) -> str | None:
    """tokenizer_config.json stores a special token either as text or as a serialized AddedToken."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) and value else None


class Tokenizer:
    """Text <-> token ids. ``bos_token``/``eos_token``/``pad_token`` (text) and their ``*_id``s;
    ``encode(text)`` never adds special tokens (the processor places bos and eos itself)."""

    def __init__(self, backend, bos_token: str, eos_token: str, pad_token: str | None,
                 clean_up_tokenization_spaces: bool = False):
        self._backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.bos_token_id = backend.token_to_id(bos_token)
        self.eos_token_id = backend.token_to_id(eos_token)
        self.pad_token_id = backend.token_to_id(pad_token) if pad_token is not None else None

    @classmethod
    def from_folder(cls, path, pad_token: str, image_token: str, extra_special_tokens: Sequence[str] = ()) -> Tokenizer:
        """``tokenizer.json`` (+ ``tokenizer_config.json``) in folder `path`, with the special tokens the
        official code has: bos, eos, unk (``"<unk>"`` where the config has no ``unk_token`` key, as
        ``LlamaTokenizerFast`` defaults it) and pad (where the config names none, the one in the file's
        padding settings, else `pad_token`, as the official processor adds it) where the file's added
        tokens lack them; then `image_token` if the vocabulary lacks it; then `extra_special_tokens`. Each is a special, unsplittable token that
        keeps its id where the vocabulary has it, new ones take the next ids in that order.

        The class named in tokenizer_config.json (``LlamaTokenizerFast``) is otherwise not used: the
        official code (transformers 4.38) ran tokenizer.json's byte-level pipeline as stored."""
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ConfigError(f"{path} has no tokenizer.json; copy tokenizer.json and tokenizer_config.json from "
                              f"the original Hugging Face checkpoint into it.")
        config = read_json_object(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        named = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        if "unk_token" not in config:
            named["unk_token"] = "<unk>"
        if not named["bos_token"] or not named["eos_token"]:
            raise ConfigError(f"the tokenizer in {path} has no bos or eos token; set bos_token and eos_token in "
                              f"its tokenizer_config.json.")
        try:
            backend = Backend.from_file(str(file))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception on a bad file
            raise ConfigError(f"{file} is not a valid tokenizer file ({one_line(exc)[:200]}); copy it again "
                              f"from the original Hugging Face checkpoint.") from None
        # a pad named only in the file's padding settings counts, as transformers reads it from there
        named["pad_token"] = named["pad_token"] or (backend.padding or {}).get("pad_token") or pad_token
        backend.no_truncation()  # encoding a prompt never cuts or pads it (a long one is refused by `generate`)
        backend.no_padding()

        def add(tokens):
            if tokens:
                backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])

        added = {token.content for token in backend.get_added_tokens_decoder().values()}
        add(list(dict.fromkeys(t for t in named.values() if t and t not in added)))
        if backend.token_to_id(image_token) is None:
            add([image_token])
        add(list(extra_special_tokens))
        return cls(backend, named["bos_token"], named["eos_token"], named["pad_token"],
                   bool(config.get("clean_up_tokenization_spaces", False)))

    @property
    def pieces_join(self) -> bool:
        """Whether decoding joins: `decode(a + b) == decode(a) + decode(b)` wherever `decode(a)` ends on a
        whole character (a byte-level decoder, as DeepSeek-VL2's, without the clean-up, which rewrites
        text across the join). A stream's text is then decoded piece by piece (`generation.RowText`)."""
        from tokenizers import decoders

        return isinstance(self._backend.decoder, decoders.ByteLevel) and not self.clean_up_tokenization_spaces

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """The ids of the special tokens (bos, eos, pad, image, grounding and role tokens, and any other
        added token marked special): opaque text to stop strings (`generation.RowText`)."""
        return frozenset(i for i, token in self._backend.get_added_tokens_decoder().items() if token.special)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without bos/eos; special tokens in the text are single ids."""
        return self._backend.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for old, new in _CLEAN_UP:
                text = text.replace(old, new)
        return text

    def __len__(self) -> int:
        """Tokens including the added ones."""
        return self._backend.get_vocab_size(with_added_tokens=True)
