"""The torch engine's safetensors reader (engines/torch_weights.py): what it loads equals what
transformers' from_pretrained loaded, tensor by tensor (one file, shards, tied and untied
embeddings, every dtype); a corrupt file stops the engine with an error naming the file and the
reason, up to the line lessord reports; a checkpoint laid out other than the model (DeepSeek-V2's
experts) goes through from_pretrained, with a line saying why."""

from __future__ import annotations

import json
import logging
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lessor.engines import torch_weights
from lessor.engines.process import free_port, last_lines
from lessor.engines.torch_weights import CorruptCheckpoint, Entry, NotLoadable

from ..support.waiting import HANG_S

torch = pytest.importorskip("torch")


def model_class(folder: Path):
    from transformers import AutoConfig

    from lessor.engines.torch_engine import _causal_lm_class

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    return _causal_lm_class(config), config


def old_path(folder: Path, dtype):
    from lessor.engines.torch_engine import _materialise

    cls, config = model_class(folder)
    model = cls.from_pretrained(folder, config=config, dtype=dtype, local_files_only=True)
    _materialise(model)
    return model


def new_path(folder: Path, dtype):
    cls, config = model_class(folder)
    return torch_weights.load_model(folder, cls, config, dtype, "cpu")


def assert_same_model(new, old) -> None:
    """Every parameter and buffer (the non-persistent rotary ones too): same names, dtypes, values."""
    for kind in ("named_parameters", "named_buffers"):
        a = dict(getattr(new, kind)(remove_duplicate=False))
        b = dict(getattr(old, kind)(remove_duplicate=False))
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and a[name].device == b[name].device, name
            assert torch.equal(a[name], b[name]), name
    assert new.config._attn_implementation == old.config._attn_implementation


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # as written, and cast on the way in
def test_the_tiny_model_equals_from_pretrained_tensor_by_tensor(tiny_qwen, dtype):
    new = new_path(tiny_qwen, getattr(torch, dtype))
    assert_same_model(new, old_path(tiny_qwen, getattr(torch, dtype)))
    # The weights are the process's own memory: no mapping of the file is left to count as page cache.
    assert str(tiny_qwen / "model.safetensors") not in mapped_files()


def test_tied_embeddings_are_one_tensor_and_untied_ones_two(tiny_qwen, tmp_path):
    from lessor.engines.tiny_qwen import write

    assert "lm_head.weight" not in {e.name for e in torch_weights.read_header(tiny_qwen / "model.safetensors").entries}
    tied = new_path(tiny_qwen, torch.float32)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied_folder = write(tmp_path / "untied", architecture={"tie_word_embeddings": False})
    untied = new_path(untied_folder, torch.float32)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert_same_model(untied, old_path(untied_folder, torch.float32))


def shard(folder: Path, out: Path, shards: int = 3) -> Path:
    """The folder's checkpoint as `shards` files and an index, as save_pretrained writes a large one."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    state = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[i::shards]}
        save_file(part, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (out / torch_weights.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def test_a_sharded_checkpoint_reads_every_shard(tiny_qwen, tmp_path):
    sharded = shard(tiny_qwen, tmp_path / "sharded")
    assert len(torch_weights.checkpoint_files(sharded)) == 3
    assert_same_model(new_path(sharded, torch.float32), old_path(tiny_qwen, torch.float32))


def test_an_index_naming_a_missing_shard_names_it(tiny_qwen, tmp_path):
    sharded = shard(tiny_qwen, tmp_path / "sharded")
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CorruptCheckpoint, match="model-00002-of-00003.safetensors") as caught:
        torch_weights.checkpoint_files(sharded)
    assert caught.value.path == str(sharded / torch_weights.INDEX)


def test_a_tensor_in_two_shards_names_both(tiny_qwen, tmp_path):
    from safetensors.torch import load_file, save_file

    sharded = shard(tiny_qwen, tmp_path / "sharded")
    first, second = torch_weights.checkpoint_files(sharded)[:2]
    name, tensor = sorted(load_file(first).items())[0]
    save_file(load_file(second) | {name: tensor}, second)
    with pytest.raises(CorruptCheckpoint, match=f"tensor '{name}' is in {first.name} too") as caught:
        new_path(sharded, torch.float32)
    assert caught.value.path == str(second)


def test_every_dtype_shape_and_size_reads_as_safetensors_reads_it(tmp_path):
    from safetensors.torch import load_file, save_file

    state = {name: torch.arange(12).reshape(3, 4).to(getattr(torch, attr)) for name, (attr, _) in torch_weights.DTYPES.items()}
    state |= {"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 5),
              "odd": torch.arange(3, dtype=torch.int8)}
    save_file(state, tmp_path / "all.safetensors")
    got = torch_weights.read_tensors([tmp_path / "all.safetensors"])
    want = load_file(tmp_path / "all.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), want[name].reshape(-1).view(torch.uint8)), name


def test_the_reads_cover_every_byte_once_in_few_calls():
    entries = [Entry("a", "U8", (10,), 100, 10), Entry("b", "U8", (15,), 110, 15), Entry("c", "U8", (5,), 130, 5),
               Entry("d", "U8", (2,), 135, 2), Entry("big", "U8", (70,), 137, 70)]
    reads = torch_weights.plan(entries, chunk_bytes=32)
    covered = [(r.offset + sum(p.length for p in r.pieces[:i]), p) for r in reads for i, p in enumerate(r.pieces)]
    by_name = {e.name: e for e in entries}
    assert all(at == by_name[p.name].offset + p.start for at, p in covered)
    assert {e.name: sum(p.length for _, p in covered if p.name == e.name) for e in entries} == \
        {e.name: e.nbytes for e in entries}
    # Neighbours share a read (a and b; c and d), a hole in the file ends one (b to c), no read is
    # over the chunk, and a larger tensor is read in slices of it.
    assert [[(p.name, p.length) for p in r.pieces] for r in reads] == [
        [("a", 10), ("b", 15)], [("c", 5), ("d", 2)], [("big", 32)], [("big", 32)], [("big", 6)]]


def test_short_reads_are_continued_where_they_stopped(tmp_path, monkeypatch):
    import os

    data = bytes(range(256)) * 4
    (tmp_path / "f").write_bytes(data)
    real = os.preadv

    def a_few_bytes_at_a_time(fd, views, offset):  # what a signal or a network file system may do
        first = views[0][:7]
        return real(fd, [first], offset)

    monkeypatch.setattr(os, "preadv", a_few_bytes_at_a_time)
    out = [bytearray(100), bytearray(0), bytearray(900)]
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        torch_weights.read_exact(fd, [memoryview(b) for b in out], 24, tmp_path / "f")
        assert b"".join(out) == data[24:]
        with pytest.raises(CorruptCheckpoint, match="truncated: the read at byte 1024"):
            torch_weights.read_exact(fd, [memoryview(bytearray(10))], 1020, tmp_path / "f")
    finally:
        os.close(fd)


# -- corrupt files -----------------------------------------------------------------------------

def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def with_header(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def first_tensor(header: dict) -> str:
    return min((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1000])


def too_short(path: Path) -> None:
    path.write_bytes(b"\x10\x00\x00")


def header_too_long(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])


def not_json(path: Path) -> None:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(raw[:8] + b"{" * length + raw[8 + length:])


def offsets_out_of_range(path: Path) -> None:
    header, data = header_of(path)
    name = first_tensor(header)
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + len(data), end + len(data)]
    with_header(path, header, data)


def unknown_dtype(path: Path) -> None:
    header, data = header_of(path)
    header[first_tensor(header)]["dtype"] = "Q4_K"
    with_header(path, header, data)


def size_disagrees(path: Path) -> None:
    header, data = header_of(path)
    header[first_tensor(header)]["shape"][0] += 1
    with_header(path, header, data)


CORRUPT = [
    (truncated, "past the end of the file"),
    (too_short, "truncated: 3 bytes, less than the 8-byte header length"),
    (header_too_long, "runs past the end of the file"),
    (not_json, "the header is not JSON"),
    (offsets_out_of_range, "past the end of the file"),
    (unknown_dtype, "has dtype 'Q4_K', which this reader does not know"),
    (size_disagrees, "needs"),
]


@pytest.fixture
def corrupt_copy(tiny_qwen, tmp_path):
    def make(damage) -> Path:
        folder = shutil.copytree(tiny_qwen, tmp_path / damage.__name__)
        damage(folder / "model.safetensors")
        return folder
    return make


@pytest.mark.parametrize("damage,words", CORRUPT, ids=[d.__name__ for d, _ in CORRUPT])
def test_a_corrupt_file_is_a_typed_error_naming_the_file_and_the_reason(corrupt_copy, damage, words):
    from lessor.engines.torch_engine import Engine

    folder = corrupt_copy(damage)
    engine = Engine(str(folder), "float32", "cpu", None)
    with pytest.raises(CorruptCheckpoint) as caught:  # not the fallback: from_pretrained would fail less clearly
        engine.load_weights()
    assert caught.value.path == str(folder / "model.safetensors") and words in caught.value.reason
    assert str(caught.value).startswith(f"{folder / 'model.safetensors'}: ")


def test_the_engine_stops_on_a_corrupt_file_with_the_reason_as_its_last_line(corrupt_copy):
    folder = corrupt_copy(unknown_dtype)
    run = subprocess.run([sys.executable, "-m", "lessor.engines.torch_server", "--model-path", str(folder),
                          "--port", str(free_port()), "--dtype", "float32"],
                         capture_output=True, text=True, timeout=HANG_S)
    lines = (run.stdout + run.stderr).splitlines()
    assert run.returncode == 3, lines
    # What lessord says of the exit (ProcessEnded's message ends with the log's last lines).
    reason = last_lines(lines)
    assert f"cannot read the weights: {folder / 'model.safetensors'}: tensor" in reason and "'Q4_K'" in reason
    assert not any(line.startswith("Traceback") for line in lines), lines  # one line, the file and the reason


# -- the fallback: transformers' loader --------------------------------------------------------

@pytest.fixture(scope="module")
def deepseek_v2(tmp_path_factory):
    from lessor.engines.tiny_qwen import write_deepseek_v2

    return write_deepseek_v2(tmp_path_factory.mktemp("models") / "tiny-deepseek-v2")


def test_a_checkpoint_transformers_converts_loads_through_from_pretrained_saying_why(deepseek_v2, caplog):
    from lessor.engines.torch_engine import Engine

    with pytest.raises(NotLoadable, match="the checkpoint has tensors the model has not .*experts"):
        new_path(deepseek_v2, torch.float32)
    engine = Engine(str(deepseek_v2), "float32", "cpu", None)
    with caplog.at_level(logging.INFO, logger="lessor.torch_engine"):
        engine.load_weights()
    said = [r.getMessage() for r in caplog.records if r.name == "lessor.torch_engine"]
    assert len(said) == 1 and "through transformers' from_pretrained" in said[0] and "experts" in said[0]
    assert_same_model(engine.model, old_path(deepseek_v2, torch.float32))
    assert str(deepseek_v2 / "model.safetensors") not in mapped_files()  # _materialise copied it off the file


def test_the_fast_path_says_nothing_and_loads_what_from_pretrained_did(tiny_qwen, caplog):
    from lessor.engines.torch_engine import Engine

    engine = Engine(str(tiny_qwen), "float32", "cpu", None)
    with caplog.at_level(logging.INFO, logger="lessor.torch_engine"):
        engine.load_weights()
    assert not [r for r in caplog.records if r.name == "lessor.torch_engine"]
    assert engine.phase == "weights_loaded" and not engine.model.training
    assert not any(p.requires_grad for p in engine.model.parameters())
    assert_same_model(engine.model, old_path(tiny_qwen, torch.float32).requires_grad_(False))


def test_names_or_shapes_other_than_the_models_are_not_loadable(tiny_qwen, tmp_path):
    cls, config = model_class(tiny_qwen)
    config.intermediate_size *= 2
    with pytest.raises(NotLoadable, match=r"shaped other than the model's: .*mlp"):
        torch_weights.load_model(tiny_qwen, cls, config, torch.float32, "cpu")
    with pytest.raises(NotLoadable, match="has neither model.safetensors nor"):
        torch_weights.checkpoint_files(tmp_path)
