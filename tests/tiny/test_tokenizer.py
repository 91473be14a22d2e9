"""The SPM tokenizer: hand-checked cases, round trip on all shipped text, identity after a GGUF round trip."""

from __future__ import annotations

import pytest

from seeddelta.runtime.tokenizers.spm import (
    SPACE,
    TYPE_BYTE,
    TYPE_CONTROL,
    TYPE_NORMAL,
    TYPE_UNKNOWN,
    SPMTokenizer,
    tiny_tokenizer,
)
from seeddelta.tiny import dataset as ds


@pytest.fixture(scope="module")
def tok() -> SPMTokenizer:
    return tiny_tokenizer()


def pieces(tok: SPMTokenizer, text: str) -> list[str]:
    return [tok.token_to_piece(i) for i in tok.encode(text)]


def test_vocabulary_layout(tok):
    assert tok.n_vocab <= 512
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.types[:3] == [TYPE_UNKNOWN, TYPE_CONTROL, TYPE_CONTROL]
    assert tok.pieces[:3] == ["<unk>", "<s>", "</s>"]
    byte_ids = [i for i, t in enumerate(tok.types) if t == TYPE_BYTE]
    assert len(byte_ids) == 256
    assert [tok.token_to_piece(i) for i in byte_ids] == [f"<0x{b:02X}>" for b in range(256)]
    assert all(t == TYPE_NORMAL for t in tok.types[259:])
    assert len(set(tok.pieces)) == tok.n_vocab


def test_hand_checked_cases(tok):
    assert pieces(tok, "\n") == ["<0x0A>"], "newline has no piece: byte fallback"
    assert pieces(tok, "a b") == ["a", SPACE, "b"], "space is escaped to U+2581, no space prefix"
    assert pieces(tok, "é") == ["<0xC3>", "<0xA9>"], "unknown character: one byte piece per UTF-8 byte"
    assert pieces(tok, "€x") == ["<0xE2>", "<0x82>", "<0xAC>", "x"]
    assert pieces(tok, "### TASK\ncopy\n") == ["###▁TASK", "<0x0A>", "c", "o", "p", "y", "<0x0A>"]
    assert pieces(tok, "IN: ok OK") == ["IN:▁", "o", "k", SPACE, "OK"], "lower case never merges"
    assert pieces(tok, "SUM: 12+3") == ["SUM:▁", "1", "2", "+", "3"]
    assert pieces(tok, "BAL: (()") == ["BAL:▁", "(", "(", ")"]
    assert pieces(tok, "BAD BA") == ["BAD", SPACE, "BA"], "prefix pieces exist so that words are reachable"
    # "##" (score -2) outranks "###" (score -3): after the leftmost "##" merge, the right pair "#","#"
    # beats "##"+"#", so four hashes become two pieces of two
    assert pieces(tok, "####") == ["##", "##"]
    assert pieces(tok, "###") == ["###"]
    assert tok.encode("", add_bos=True) == [tok.bos_id]
    assert tok.decode([tok.bos_id, tok.eos_id, tok.unk_id]) == "", "control/unknown pieces decode to nothing"


def test_merge_priority_follows_scores_then_position():
    # a hand-made vocabulary: "abc" can become ab+c or a+bc; the higher-scored pair wins
    def mk(s_ab: float, s_bc: float) -> SPMTokenizer:
        p = ["<unk>", "<s>", "</s>", "a", "b", "c", "ab", "bc"]
        return SPMTokenizer(p, [0, 0, 0, 0, 0, 0, s_ab, s_bc], [2, 3, 3, 1, 1, 1, 1, 1])

    def split(t: SPMTokenizer, text: str) -> list[str]:
        return [t.token_to_piece(i) for i in t.encode(text)]

    assert split(mk(-1, -2), "abc") == ["ab", "c"]
    assert split(mk(-2, -1), "abc") == ["a", "bc"]
    assert split(mk(-1, -1), "abc") == ["ab", "c"], "equal scores: leftmost first"
    # no byte pieces in this vocabulary: an unknown character becomes <unk> per byte
    assert mk(-1, -1).encode("z") == [0]


def test_round_trip_and_copy_payload_is_per_character(tok):
    val = ds.load_val_text()
    assert tok.decode(tok.encode(val)) == val
    for r in ds.load_test_pack():
        for text in (r.prompt, r.answer, r.prompt + r.answer + "\n"):
            assert tok.decode(tok.encode(text)) == text
        if r.task == "copy":
            assert len(tok.encode(r.answer)) == len(r.answer), "one token per copied character"


def test_tokenizing_samples_separately_equals_tokenizing_the_concatenation(tok):
    # training builds streams from per-sample (prompt, answer) encodings; this is only valid because
    # no piece spans a newline. Check it on the whole validation text and on every test sample.
    val, test = ds.make_heldout()
    joined: list[int] = []
    for s in val:
        joined += tok.encode(s.prompt) + tok.encode(s.answer + "\n")
    assert joined == tok.encode(ds.load_val_text())
    for s in test:
        assert tok.encode(s.prompt) + tok.encode(s.answer + "\n") == tok.encode(s.text)


def test_validation_text_has_at_least_8_windows_at_ctx_2048(tok):
    assert len(tok.encode(ds.load_val_text())) // 2048 >= 8


def test_gguf_round_trip_gives_identical_ids(tok, tmp_path):
    import gguf

    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    tok.add_to_gguf(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = gguf.GGUFReader(str(path))
    assert r.fields["tokenizer.ggml.model"].contents() == "llama"
    assert r.fields["tokenizer.ggml.add_space_prefix"].contents() is False
    assert r.fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert r.fields["tokenizer.ggml.add_eos_token"].contents() is False
    back = SPMTokenizer.from_gguf(path)
    assert back.pieces == tok.pieces and back.types == tok.types
    assert back.scores == tok.scores, "scores are small integers, exact in float32"
    assert (back.bos_id, back.eos_id, back.unk_id, back.add_space_prefix) == (1, 2, 0, False)
    val = ds.load_val_text()
    assert back.encode(val) == tok.encode(val)
    for r in ds.load_test_pack():
        assert back.encode(r.prompt, add_bos=True) == tok.encode(r.prompt, add_bos=True)
