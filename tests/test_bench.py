"""The decode benchmark's own measurements on a tiny model: every figure present, sane, and consistent."""

from __future__ import annotations

import json
import stat

import pytest

from tests.conftest import make_hf_model
from tests.infer.test_engine import ByteTokenizer
from trainfer.bench import llama_bench, measure_engine, paired_decode
from trainfer.io.loader import load_model
from trainfer.llm import LLM


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_hf_model("llama", vocab_size=256, max_position_embeddings=2048).save_pretrained(path)
    model, _ = load_model(path)
    return LLM(model, ByteTokenizer(), num_blocks=600, block_size=16, max_num_batched_tokens=256)


def test_measure_engine_reports_every_figure(tiny_llm):
    r = measure_engine(tiny_llm, runs=1, new_tokens=8, concurrency=(2, 4), bandwidth=10.0)
    for key in ("ttft_42_ms", "prefill_512_tok_s", "decode_tok_s", "aggregate_2_tok_s", "aggregate_4_tok_s"):
        assert r[key] > 0, key
    # the warm prefix skips ~1,000 tokens of prefill, so it must be the faster of the two
    assert r["prefix_warm_ttft_ms"] < r["prefix_cold_ttft_ms"]
    weight_bytes = sum(p.numel() * p.element_size() for p in tiny_llm.model.parameters())
    assert r["roofline_tok_s"] == pytest.approx(10e9 / weight_bytes, rel=1e-3)
    assert r["fraction_of_roofline"] == pytest.approx(r["decode_tok_s"] / r["roofline_tok_s"], abs=1e-4)
    tiny_llm.engine.pool.check_idle()


def test_llama_bench_output_is_parsed(tmp_path):
    # The two rows llama-bench -o json prints for -p 512 -n 128 (fields trimmed to the ones read).
    rows = [{"n_prompt": 512, "n_gen": 0, "avg_ts": 556.2}, {"n_prompt": 0, "n_gen": 128, "avg_ts": 51.04}]
    fake = tmp_path / "llama-bench"
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(rows)}\nEOF\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    assert llama_bench(fake, tmp_path / "m.gguf", 2) == {"prefill_512_tok_s": 556.2, "decode_tok_s": 51.0}


def test_paired_decode_alternates_rounds_and_takes_the_median_ratio(tiny_llm, tmp_path):
    # A stand-in llama-bench that accepts only a generation-only run of the right length and reports 1,000 tok/s.
    fake = tmp_path / "llama-bench"
    rows = json.dumps([{"n_prompt": 0, "n_gen": 8, "avg_ts": 1000.0}])
    fake.write_text(
        f'#!/bin/sh\ncase "$*" in *"-p 0 -n 8 -r 1"*) ;; *) exit 3 ;; esac\necho "$*" >> {tmp_path}/calls\n'
        f"cat <<'EOF'\n{rows}\nEOF\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    r = paired_decode(tiny_llm, fake, tmp_path / "m.gguf", 2, new_tokens=8, rounds=3)
    assert len((tmp_path / "calls").read_text().splitlines()) == 3
    assert r["rounds"] == 3 and r["llama_cpp_decode_tok_s"] == 1000.0
    assert r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"]
    assert r["ratio_median"] == pytest.approx(r["decode_tok_s"] / 1000.0, rel=1e-2)
    tiny_llm.engine.pool.check_idle()


@pytest.mark.real
def test_the_sizes_benchmark_writes_a_loadable_file_and_measures_it(tmp_path, monkeypatch):
    """benchmarks/sizes.py on a tiny shape: its gguf-written file has the shape's tensors in Q8_0 and SmolLM2's
    vocabulary, trainfer runs it in place, and a trainfer round reports every figure (llama.cpp's side needs a
    llama.cpp build)."""
    import importlib.util
    from pathlib import Path

    from trainfer.io.gguf_file import GGUFFile

    spec = importlib.util.spec_from_file_location("sizes", Path(__file__).parents[1] / "benchmarks" / "sizes.py")
    sizes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sizes)
    monkeypatch.setitem(sizes.SHAPES, "tiny", (256, 2, 4, 2, 512, False))
    path = tmp_path / "tiny.Q8_0.gguf"
    sizes.write_q8_0(path, "tiny")
    f = GGUFFile(path)
    assert len(f.tensors) == 3 + 9 * 2 and {t.tensor_type.name for t in f.tensors} == {"Q8_0", "F32"}
    llm = LLM.load(path, kv_cache_gb=0.05)
    cfg = llm.model.cfg
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.tie_embeddings) == (
        256, 2, 4, 2, 512, False)  # fmt: skip
    assert llm.weights == "Q8_0" and cfg.vocab_size == 49152
    row = sizes.round_trainfer(path, prompt=16, gen=4)
    assert row["weights"] == "Q8_0" and row["peak_rss_gib"] > 0
    assert all(row[k] > 0 for k in ("launch_s", "prefill_tok_s", "decode_tok_s"))
