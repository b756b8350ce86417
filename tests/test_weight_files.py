"""Weight files from elsewhere: a damaged GGUF or torch.save file is a ValueError naming the file (and, for GGUF,
the field), and a safetensors index can only name shards inside its own folder."""

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medcap.models.gguf_file import GGUFFile
from medcap.models.llm_weights import hf_weight_files
from medcap.models.tensor_files import load_weights_only

A = np.arange(3 * 32, dtype=np.float32).reshape(3, 32)
B = np.linspace(-1, 1, 64, dtype=np.float32)


def write_gguf(path: Path, alignment: int | str | None = None) -> bytes:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_token_list(["a", "b", "ab"])
    if alignment is not None:  # recorded only: the writer still pads to its own 32 bytes
        add = writer.add_string if isinstance(alignment, str) else writer.add_uint32
        add("general.alignment", alignment)
    writer.add_tensor("weight_a", A)
    writer.add_tensor("weight_b", B.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def first_key_end(data: bytes) -> int:
    """Where the first metadata key's value type sits (after magic, version, counts and the key)."""
    return 32 + struct.unpack_from("<Q", data, 24)[0]


def qtype_at(data: bytes, name: bytes) -> int:
    """Where the quantisation type of tensor ``name`` sits in its tensor info."""
    pos = data.index(name) + len(name)
    return pos + 4 + 8 * struct.unpack_from("<I", data, pos)[0]


def test_an_intact_gguf_file_reads_back(tmp_path):
    write_gguf(tmp_path / "ok.gguf")
    g = GGUFFile(tmp_path / "ok.gguf")
    assert g.metadata["general.name"] == "tiny" and g.metadata["tokenizer.ggml.tokens"] == ["a", "b", "ab"]
    assert np.array_equal(g.load("weight_a"), A)
    assert np.allclose(g.load("weight_b"), B, atol=1e-3)


def damaged(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value):]


@pytest.mark.parametrize("damage, message", [
    (lambda d: b"", r"empty file"),
    (lambda d: d[:30], r"metadata key #0: needs 8 bytes at byte 24, 6 left"),
    (lambda d: d[:first_key_end(d) + 2], r"general.architecture: value type: needs 4 bytes"),
    (lambda d: damaged(d, 24, struct.pack("<Q", 2**64 - 1)), r"metadata key #0: needs 18446744073709551615 bytes"),
    (lambda d: damaged(d, first_key_end(d), struct.pack("<I", 99)), r"general.architecture: unknown value type 99"),
    (lambda d: damaged(d, qtype_at(d, b"weight_b"), struct.pack("<I", 77)),
     r"tensor 'weight_b': unknown quantization type 77"),
    (lambda d: d[:-10], r"tensor 'weight_b': its data ends at byte \d+, past the end of the file \(\d+ bytes\)"),
    (lambda d: d.replace(b"weight_b", b"weight_a"), r"tensor 'weight_a': a second tensor with this name"),
    (lambda d: damaged(d, d.index(b"weight_b") + 12, struct.pack("<Q", 0)),
     r"tensor 'weight_b': shape \[0\] has a dimension of 0 or one too large"),
])
def test_a_damaged_gguf_file_is_an_error_naming_the_file_and_the_field(tmp_path, damage, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(damage(write_gguf(tmp_path / "ok.gguf")))
    with pytest.raises(ValueError, match=rf"bad\.gguf: .*{message}"):
        GGUFFile(path)


def test_a_gguf_with_nested_arrays_or_settings_of_the_wrong_type_is_refused_by_name(tmp_path):
    from torchtune.models.llama2 import llama2

    from medcap.models.llm_weights import check_gguf_settings

    path = tmp_path / "nested.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_array("x", [[[[[1]]]]])  # 2,000 levels in 24 KB exhausted Python's recursion
    writer.add_tensor("a", A)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"nested\.gguf: x\[0\]\[0\]\[0\]\[0\]: arrays nested more than 4 deep"):
        GGUFFile(path)

    class Read:
        metadata = {"llama.rope.freq_base": "10000", "llama.attention.head_count": 2}
    decoder = llama2(vocab_size=32, num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=16, max_seq_len=8)
    with pytest.raises(ValueError, match=r"m\.gguf: llama.rope.freq_base: expected a number, found str"):
        check_gguf_settings(decoder, "m.gguf", Read())


@pytest.mark.parametrize("alignment", [0, "32"])
def test_a_gguf_alignment_that_is_not_a_positive_integer_is_refused(tmp_path, alignment):
    path = tmp_path / "aligned.gguf"
    write_gguf(path, alignment)
    with pytest.raises(ValueError, match=rf"aligned\.gguf: general.alignment must be a positive integer, found "
                                         rf"{alignment!r}"):
        GGUFFile(path)


@pytest.mark.parametrize("label, content", [("text", b"hello, not a checkpoint\n"), ("truncated", None),
                                            ("empty", b"")])
def test_a_damaged_torch_save_file_is_a_value_error_naming_it(tmp_path, label, content):
    path = tmp_path / f"{label}.pt"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:600] if content is None else content)
    with pytest.raises(ValueError, match=rf"{label}\.pt: not a readable torch.save file \("):
        load_weights_only(path, "tensors")
    torch.save({"w": torch.ones(2)}, path)
    assert torch.equal(load_weights_only(path, "tensors")["w"], torch.ones(2))


def test_damaged_safetensors_json_and_index_files_are_errors_naming_them(tmp_path):
    import numpy as np

    from medcap.models.llm_weights import llama_decoder_from_hf_config, read_weight_file
    from medcap.models.tensor_files import read_json
    from medcap.retrieval import CaptionIndex

    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1000)}, weights)
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(ValueError, match=rf"{weights}: not a readable safetensors file \(Error while deserializing"):
        read_weight_file(weights)
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama",\n "hidden_size": 8,')
    with pytest.raises(ValueError, match=rf"{config}: line 2: invalid JSON \(Expecting property name"):
        read_json(config)
    config.write_bytes(b'{"name": "\xff"}')
    with pytest.raises(ValueError, match=rf"{config}: not UTF-8 text \(invalid start byte at byte 10\)"):
        read_json(config)
    llama = {"model_type": "llama", "vocab_size": 32000, "num_attention_heads": 4, "num_hidden_layers": "2",
             "max_position_embeddings": 64, "intermediate_size": 32}
    with pytest.raises(ValueError, match="c.json: hidden_size, num_hidden_layers: missing or not an integer"):
        llama_decoder_from_hf_config(llama, "llama2", "c.json")

    eye = np.eye(3, dtype=np.float32)
    for name, damage in (("meta.json", b"{oops"), ("embeddings.safetensors", b"\x00" * 12), ("index.faiss", b"xyz")):
        folder = tmp_path / name.replace(".", "_")
        CaptionIndex(eye, ["a", "b", "c"], ["x", "y", "z"]).save(folder)
        (folder / name).write_bytes(damage)
        with pytest.raises(ValueError, match=rf"{folder / name}: (line 1: invalid JSON|not a readable safetensors "
                                             rf"file|not a readable faiss index)"):
            CaptionIndex.load(folder)


@pytest.mark.parametrize("shard", ["../elsewhere/other.safetensors", "ABSOLUTE", "sub/../../elsewhere/x.safetensors",
                                   "..", 3])
def test_an_index_cannot_name_a_shard_outside_its_folder(tmp_path, shard):
    model, elsewhere = tmp_path / "model", tmp_path / "elsewhere"
    model.mkdir(), elsewhere.mkdir()
    save_file({"secret": torch.arange(3.0)}, elsewhere / "other.safetensors")
    shard = str(elsewhere / "other.safetensors") if shard == "ABSOLUTE" else shard
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(ValueError, match=rf"{index}: weight_map\['a'\] = {json.dumps(shard)} is not a file name"):
        hf_weight_files(model)


def test_an_index_lists_its_shards_and_needs_a_weight_map(tmp_path):
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        save_file({"x": torch.zeros(1)}, tmp_path / name)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors",
                                                "b": "model-00001-of-00002.safetensors"}}))
    assert hf_weight_files(tmp_path) == [tmp_path / "model-00001-of-00002.safetensors",
                                         tmp_path / "model-00002-of-00002.safetensors"]
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=rf"{index}: no weight_map"):
        hf_weight_files(tmp_path)
    index.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{index}: not valid JSON"):
        hf_weight_files(tmp_path)
