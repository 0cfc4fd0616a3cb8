"""The GGUF header reader (io/gguf_file.py) against gguf's own GGUFReader, and on damaged files."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from tests.conftest import make_hf_model
from tests.io.test_gguf import write_gguf
from trainfer.errors import TrainferError
from trainfer.io.gguf_file import GGUFFile


def same_as_gguf_reader(path) -> None:
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata.keys() == want.keys()
    for key, value in want.items():
        assert ours.metadata[key] == pytest.approx(value) if isinstance(value, float) else ours.metadata[key] == value
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert (a.tensor_type, a.shape, a.n_bytes) == (b.tensor_type, tuple(int(n) for n in b.shape), int(b.n_bytes))
        np.testing.assert_array_equal(np.asarray(a.data).reshape(-1), np.asarray(b.data).reshape(-1))


def test_a_written_file_reads_as_gguf_reads_it(tmp_path):
    write_gguf(tmp_path / "m.gguf", make_hf_model("llama", vocab_size=96, hidden_size=64, intermediate_size=128),
               gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    same_as_gguf_reader(tmp_path / "m.gguf")


@pytest.mark.real
def test_smollm2_reads_as_gguf_reads_it(smollm2_path):
    same_as_gguf_reader(smollm2_path)


def test_damaged_files_are_one_line_errors(tmp_path):
    write_gguf(tmp_path / "m.gguf", make_hf_model("llama", vocab_size=96, hidden_size=64, intermediate_size=128))
    data = (tmp_path / "m.gguf").read_bytes()
    cases = {
        "empty": b"",
        "magic": b"GGUX" + data[4:],
        "version": data[:4] + (9).to_bytes(4, "little") + data[8:],
        "huge count": data[:8] + (1 << 60).to_bytes(8, "little") + data[16:],
        "cut header": data[:200],
        "cut data": data[: len(data) - 64],
    }
    for name, content in cases.items():
        (tmp_path / f"{name}.gguf").write_bytes(content)
        with pytest.raises(TrainferError, match="corrupt or truncated"):
            GGUFFile(tmp_path / f"{name}.gguf")
