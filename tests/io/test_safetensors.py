"""The lazy safetensors reader, header validation and opening checkpoint layouts."""

from __future__ import annotations

import json
import os
import struct

import pytest
import safetensors.torch
import torch

from fastmerge import io
from fastmerge.io import CheckpointError, read_header
from fastmerge.io import safetensors as st

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
          torch.int32, torch.int8, torch.uint8, torch.bool]  # fmt: skip


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 50
    return (x > 0) if dtype == torch.bool else x.to(dtype)


def test_reader_matches_the_safetensors_library(tmp_path):
    tensors = {f"t{i}": sample(d, (3, 5), i) for i, d in enumerate(DTYPES)}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["odd"] = sample(torch.bfloat16, (7, 1, 3))
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(tensors, path)
    reader = io.SafetensorsReader(path)
    assert sorted(reader) == sorted(tensors)
    for name, expected in tensors.items():
        got = reader[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert torch.equal(got, expected), name
        assert reader.info(name).nbytes == expected.numel() * expected.element_size()


def test_reader_reads_only_on_access(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"a": torch.ones(4), "b": torch.zeros(8)}, path)
    reads = []
    real = os.preadv
    monkeypatch.setattr(
        st.os, "preadv", lambda fd, bufs, off: reads.append(off) or real(fd, bufs, off)
    )
    reader = io.SafetensorsReader(path)
    ckpt = io.open_checkpoint(path)
    assert "a" in reader and "a" in ckpt and reader.info("b").shape == (8,)
    assert len(reader) == 2 and ckpt.info("a").numel == 4
    assert reads == []  # opening, membership and info read no tensor data
    assert reader["b"].tolist() == [0.0] * 8
    assert len(reads) == 1
    # every access reads again from disk: the file changed, the value follows
    data = bytearray(path.read_bytes())
    data[reads[0] : reads[0] + 4] = struct.pack("<f", 7.0)
    path.write_bytes(bytes(data))
    assert reader["b"][0].item() == 7.0


def write_raw(path, header: dict, data: bytes = b"", length=None) -> None:
    raw = json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)


@pytest.mark.parametrize(
    "header, data, length, message",
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None,
         "truncated: key 'w'"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"", 10_000,
         "header of 10000 bytes"),
        ({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None,
         "key 'w': unknown dtype 'Q7'"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None,
         "key 'w': 8 bytes for shape [3]"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 8, None,
         "key 'w': bad shape"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None,
         "key 'w': bad data_offsets"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None,
         "overlaps"),
        (["not", "an", "object"], b"", None, "not a JSON object"),
    ],
)  # fmt: skip
def test_corrupt_headers_name_file_and_key(tmp_path, header, data, length, message):
    path = tmp_path / "bad.safetensors"
    write_raw(path, header, data, length)
    with pytest.raises(io.CheckpointError) as info:
        io.SafetensorsReader(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_not_json_too_short_missing(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(io.CheckpointError, match="not JSON"):
        io.SafetensorsReader(bad)
    bad.write_bytes(b"abc")
    with pytest.raises(io.CheckpointError, match="truncated: 3 bytes"):
        io.SafetensorsReader(bad)
    with pytest.raises(io.CheckpointError, match="no such file"):
        io.SafetensorsReader(tmp_path / "missing.safetensors")


def test_truncated_real_file(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"a": torch.ones(100), "b": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(io.CheckpointError, match=r"m.safetensors: truncated: key '.'"):
        io.open_checkpoint(path)


def make_sharded(directory, tensors: dict, per_shard: int = 2) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    shards = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, group in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.torch.save_file({n: tensors[n] for n in group}, directory / filename)
        weight_map.update(dict.fromkeys(group, filename))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_hf_and_plain_directories(tmp_path):
    tensors = {f"layer{i}.weight": sample(torch.float32, (4, i + 1), i) for i in range(5)}
    make_sharded(tmp_path / "sharded", tensors)
    hf = tmp_path / "hf"
    hf.mkdir()
    safetensors.torch.save_file(tensors, hf / "model.safetensors")
    (hf / "config.json").write_text("{}")
    plain = tmp_path / "plain"
    plain.mkdir()
    safetensors.torch.save_file(dict(list(tensors.items())[:2]), plain / "a.safetensors")
    safetensors.torch.save_file(dict(list(tensors.items())[2:]), plain / "b.safetensors")
    for d in ("sharded", "hf", "plain"):
        ckpt = io.open_checkpoint(tmp_path / d)
        assert sorted(ckpt) == sorted(tensors), d
        for name, t in tensors.items():
            assert torch.equal(ckpt[name], t), (d, name)
    assert (
        io.open_checkpoint(tmp_path / "sharded")
        .file_of("layer4.weight")
        .endswith("model-00003-of-00003.safetensors")
    )


def test_index_errors(tmp_path):
    tensors = {f"w{i}": torch.ones(2) for i in range(4)}
    make_sharded(tmp_path / "m", tensors)
    index = tmp_path / "m" / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    content["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(content))
    with pytest.raises(io.CheckpointError, match="no key 'ghost'"):
        io.open_checkpoint(tmp_path / "m")
    content["weight_map"]["ghost"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(content))
    with pytest.raises(io.CheckpointError, match="model-00009-of-00009.safetensors .* is missing"):
        io.open_checkpoint(tmp_path / "m")
    index.write_text("{broken")
    with pytest.raises(io.CheckpointError, match="corrupt index"):
        io.open_checkpoint(tmp_path / "m")


def test_duplicate_key_and_empty_directory(tmp_path):
    safetensors.torch.save_file({"w": torch.ones(1)}, tmp_path / "a.safetensors")
    safetensors.torch.save_file({"w": torch.ones(1)}, tmp_path / "b.safetensors")
    with pytest.raises(io.CheckpointError, match="key 'w' is also in"):
        io.open_checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(io.CheckpointError, match="no \\*.safetensors"):
        io.open_checkpoint(tmp_path / "empty")
    with pytest.raises(io.CheckpointError, match="no such file or directory"):
        io.open_checkpoint(tmp_path / "nowhere")


class Payload:
    """Not a tensor: torch.load(weights_only=True) must refuse to build it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_refused_then_loaded_weights_only(tmp_path, capsys):
    torch.save({"w": torch.arange(3.0)}, tmp_path / "model.bin")
    with pytest.raises(io.CheckpointError, match="pickle checkpoint refused"):
        io.open_checkpoint(tmp_path / "model.bin")
    with pytest.raises(io.CheckpointError, match="pickle checkpoint refused"):
        io.open_checkpoint(tmp_path)
    assert io.open_checkpoint(tmp_path, allow_pickle=True)["w"].tolist() == [0.0, 1.0, 2.0]
    torch.save({"w": torch.ones(1), "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(io.CheckpointError, match="weights_only=True"):
        io.open_checkpoint(tmp_path / "evil.pt", allow_pickle=True)
    assert "must never run" not in capsys.readouterr().out


# ---- hostile headers and indexes --------------------------------------------------------


def _raw_file(path, header: str, data: bytes = b"") -> None:
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_duplicate_tensor_name_is_refused(tmp_path):
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    _raw_file(tmp_path / "dup.safetensors", f'{{"w": {entry}, "w": {entry}}}', b"\0" * 4)
    with pytest.raises(CheckpointError, match="key 'w' appears twice"):
        read_header(tmp_path / "dup.safetensors")


@pytest.mark.parametrize("metadata", ['"text"', "[1]", '{"a": 1}', '{"a": {"b": "c"}}'])
def test_metadata_must_be_an_object_of_strings(tmp_path, metadata):
    _raw_file(tmp_path / "m.safetensors", f'{{"__metadata__": {metadata}}}')
    with pytest.raises(CheckpointError, match="__metadata__ is not an object of strings"):
        read_header(tmp_path / "m.safetensors")


def test_deeply_nested_header_is_a_clean_error(tmp_path):
    _raw_file(tmp_path / "deep.safetensors", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="deep.safetensors: corrupt header"):
        read_header(tmp_path / "deep.safetensors")


@pytest.mark.parametrize("target", ["../outside/x.safetensors", "/etc/passwd", "a/../../x"])
def test_index_entry_outside_the_directory_is_refused(tmp_path, target):
    (tmp_path / "outside").mkdir()
    safetensors.torch.save_file({"w": torch.ones(1)}, tmp_path / "outside" / "x.safetensors")
    model = tmp_path / "model"
    model.mkdir()
    index = {"metadata": {}, "weight_map": {"w": target}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="points outside the checkpoint's directory"):
        io.open_checkpoint(model)


@pytest.mark.parametrize("map_tensors", [True, False])
def test_large_tensors_mapped_or_read_are_private_copies(tmp_path, map_tensors):
    big = torch.arange(3 << 18, dtype=torch.float32).reshape(768, 1024)  # 3 MiB: mapped
    small = torch.arange(10, dtype=torch.float64)
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"big": big, "small": small}, path)
    before = path.read_bytes()
    reader = io.SafetensorsReader(path, map_tensors=map_tensors)
    assert reader.map_tensors is map_tensors
    got = reader["big"]
    assert torch.equal(got, big) and torch.equal(reader["small"], small)
    assert torch.equal(reader.read_rows(reader.info("big"), 100, 700), big[100:700])
    got.add_(1.0)  # writable; the file and the next read are unchanged
    assert torch.equal(reader["big"], big)
    assert path.read_bytes() == before
    again = reader["big"]
    assert again.data_ptr() != got.data_ptr()
    reader.close()
    assert torch.equal(again, big)  # a map outlives the file descriptor


def test_pread_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(4)}, path)
    monkeypatch.setenv("FASTMERGE_READ", "pread")
    assert io.SafetensorsReader(path).map_tensors is False
    monkeypatch.delenv("FASTMERGE_READ")
    assert io.SafetensorsReader(path).map_tensors is True


def test_a_file_truncated_after_opening_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"a": torch.ones(1 << 20), "b": torch.ones(1 << 20)}, path)
    for map_tensors in (True, False):
        reader = io.SafetensorsReader(path, map_tensors=map_tensors)
        size = path.stat().st_size
        os.truncate(path, size - (3 << 20))
        with pytest.raises(io.CheckpointError, match="truncated"):
            reader[max(reader, key=lambda n: reader.info(n).begin)]
        reader.close()
        safetensors.torch.save_file({"a": torch.ones(1 << 20), "b": torch.ones(1 << 20)}, path)
