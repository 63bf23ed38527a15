"""`vl2_jax.tokenizer.Tokenizer` (the `tokenizers` library directly) against transformers' fast tokenizer
built from the same files the way the official processor builds it: same ids, same special ids, same
text back, on every fixture and on tokenizer files that lack the special tokens."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from conftest import VARIANTS, ckpt_dir

from vl2_jax.processor import EXTRA_SPECIAL_TOKENS, IMAGE_TOKEN, PAD_TOKEN, Processor
from vl2_jax.tokenizer import Tokenizer

SPECIALS = (IMAGE_TOKEN, *EXTRA_SPECIAL_TOKENS)
TEXTS = [
    "", " ", "  ", "\n", "\n\n", "\t", "Hello there", " Hello  there ", "a\nb\n\nc", "<|User|>: hi\n\n<|Assistant|>:",
    "<image>\n<|ref|>the giraffe<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>", "<|grounding|>Locate <|ref|>it<|/ref|>.",
    "中文的句子，还有标点。", "日本語のテキスト", "emoji 🦒🧑‍🚀 and é (e + \u0301)", "x<image>y<image><image>z",
    "<｜begin▁of▁sentence｜>text<｜end▁of▁sentence｜>", "<｜▁pad▁｜><｜▁pad▁｜>", "it's don't we're I'm ,.!?",
    "<|User|<|Assistant|>>", "<imag", "<unk> and <s>", "\u00a0non-breaking\u2003em space", "tabs\tand\r\ncarriage returns",
]


def reference(folder):
    """transformers' PreTrainedTokenizerFast as the official code had its tokenizer: tokenizer.json used as
    stored; bos, eos, pad and unk from tokenizer_config.json, unk defaulting to "<unk>" where the key is
    absent (transformers 4.38's LlamaTokenizerFast); then the official processor's additions: a pad if
    there is none, the image token if the vocabulary lacks it, the grounding and role tokens."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    named = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if config.get(k)}
    if "unk_token" not in config:
        named["unk_token"] = "<unk>"
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), padding_side="left", **named)
    special = lambda tokens: [AddedToken(t, special=True, normalized=False) for t in tokens]  # noqa: E731
    if tok.pad_token is None:
        tok.add_tokens(special([PAD_TOKEN]), special_tokens=True)
        tok.pad_token = PAD_TOKEN
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens(special([IMAGE_TOKEN]), special_tokens=True)
    tok.add_tokens(special(EXTRA_SPECIAL_TOKENS), special_tokens=True)
    return tok


def ours(folder) -> Tokenizer:
    return Tokenizer.from_folder(folder, PAD_TOKEN, IMAGE_TOKEN, EXTRA_SPECIAL_TOKENS)


def assert_same(folder):
    ref, tok = reference(folder), ours(folder)
    assert len(tok) == len(ref)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                      ref.pad_token_id)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)
    for token in (*SPECIALS, "<unk>"):
        assert tok.token_to_id(token) == ref.get_vocab().get(token), token
    assert tok.special_ids == {i for i, token in ref.added_tokens_decoder.items() if token.special}
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    rng = random.Random(0)  # any ids, split UTF-8 sequences and special tokens included
    for _ in range(50):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 12))]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_transformers_on_the_fixtures(variant):
    assert_same(ckpt_dir(variant))


def _edited(tmp_path, edit_tokenizer=None, edit_config=None):
    src = ckpt_dir("mha")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        shutil.copy(src / name, tmp_path / name)
    for name, edit in (("tokenizer.json", edit_tokenizer), ("tokenizer_config.json", edit_config)):
        if edit is not None:
            data = json.loads((tmp_path / name).read_text(encoding="utf-8"))
            edit(data)
            (tmp_path / name).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return tmp_path


def test_matches_transformers_when_the_file_lacks_special_tokens(tmp_path):
    # Only bos/eos among the added tokens: pad, image, grounding and role tokens keep their vocab ids.
    assert_same(_edited(tmp_path, lambda d: d.update(added_tokens=d["added_tokens"][:2])))


def test_matches_transformers_when_special_tokens_are_new(tmp_path):
    # Special tokens in neither the vocabulary nor the added tokens get the next ids, in the official order
    # (bos, eos, unk, pad, then image, grounding, roles); a pad named in tokenizer_config.json is used.
    def drop(data):
        gone = {"<｜▁pad▁｜>", "<image>", "<|det|>", "<|Assistant|>"}
        data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in gone]
        data["model"]["vocab"] = {k: v for k, v in data["model"]["vocab"].items() if k not in gone}

    folder = _edited(tmp_path, drop, lambda c: c.update(pad_token="<pad>"))
    assert_same(folder)
    tok = ours(folder)
    assert tok.pad_token == "<pad>" and tok.token_to_id("<image>") == tok.pad_token_id + 1
    assert tok.token_to_id("<unk>") == tok.pad_token_id - 1  # (tokenizer_config.json has no unk_token key)


def test_a_pad_named_only_in_the_padding_settings_is_the_pad(tmp_path):
    # transformers takes the pad from tokenizer.json's "padding" where tokenizer_config.json names none.
    def padding(data):
        data["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                           "pad_id": 5, "pad_type_id": 0, "pad_token": "<|det|>"}

    folder = _edited(tmp_path, padding, lambda c: c.pop("pad_token"))
    assert_same(folder)
    assert (ours(folder).pad_token, ours(folder).pad_token_id) == ("<|det|>", 6)
    assert ours(folder).encode("a b") == ours(ckpt_dir("mha")).encode("a b")  # (padding never applies)


def test_matches_transformers_when_unk_is_null(tmp_path):
    # The released configs say "unk_token": null: no <unk> is added.
    folder = _edited(tmp_path, edit_config=lambda c: c.update(unk_token=None))
    assert_same(folder)
    assert ours(folder).token_to_id("<unk>") is None and len(ours(folder)) == len(ours(ckpt_dir("mha"))) - 1


def test_matches_transformers_when_the_image_token_is_only_in_the_vocabulary(tmp_path):
    # The official processor adds the image token only where the vocabulary lacks it: one that is there as
    # a plain vocabulary entry stays plain (the text "<image>" then encodes as byte-level pieces).
    folder = _edited(tmp_path, lambda d: d.update(added_tokens=[t for t in d["added_tokens"] if t["content"] != "<image>"]))
    assert_same(folder)
    tok = ours(folder)
    assert tok.token_to_id("<image>") == 3 and tok.encode("<image>") != [3]


def test_clean_up_tokenization_spaces_as_the_official_code(tmp_path):
    # transformers 4.38 (the official code's) applies the clean-up when tokenizer_config.json asks for it
    # (newer transformers skip it for BPE, so this compares with the rule, not with the installed version).
    tok = ours(_edited(tmp_path, edit_config=lambda c: c.update(clean_up_tokenization_spaces=True)))
    ids = tok.encode("Yes , it is . Is it ? I 'm sure they 're right !")
    assert tok.decode(ids) == "Yes, it is. Is it? I'm sure they're right!"


def test_processor_uses_it():
    p = Processor.from_pretrained(ckpt_dir("mha"))
    assert isinstance(p.tokenizer, Tokenizer)
    assert (p.bos_id, p.eos_id, p.pad_id, p.image_token_id) == (0, 1, 2, 3)
