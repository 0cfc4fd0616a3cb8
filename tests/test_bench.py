"""The decode benchmark's own measurements on a tiny model: every figure present, sane, and consistent."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tests.conftest import make_hf_model
from trainfer import registry
from trainfer.bench import llama_bench_rows, measure_engine, paired_decode, parse_batched_bench, parse_llama_bench
from trainfer.io.loader import load_model
from trainfer.llm import LLM


class ByteTokenizer:
    """Stand-in tokenizer over raw bytes so the tiny random model can stream text."""

    stop_token_ids = {2}

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode("utf-8", errors="replace")


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


FIXTURES = Path(__file__).parent / "fixtures"


def test_llama_bench_output_is_parsed():
    """A real `llama-bench -m smollm2-135m-instruct.Q8_0.gguf -t 2 -p 16 -n 8 -r 2 -o json` (llama-cpp-python 0.3.36's
    tree, 2026-12-05): a prefill row and a generation row, every field read here present."""
    rows = parse_llama_bench((FIXTURES / "llama-bench.json").read_text())
    assert [(r["n_prompt"], r["n_gen"], r["n_threads"]) for r in rows] == [(16, 0, 2), (0, 8, 2)]
    assert all(r["avg_ts"] == pytest.approx(sum(r["samples_ts"]) / 2, rel=1e-3) for r in rows)
    broken = json.loads((FIXTURES / "llama-bench.json").read_text())
    del broken[1]["avg_ts"]
    with pytest.raises(ValueError, match="lacks avg_ts"):
        parse_llama_bench(json.dumps(broken))


def test_llama_batched_bench_output_is_parsed():
    """A real `llama-batched-bench -npp 16 -ntg 4 -npl 2 --output-format jsonl` on the same file."""
    row = parse_batched_bench("main: some log line\n" + (FIXTURES / "llama-batched-bench.jsonl").read_text())
    assert row["streams"] == 2 and row["decode_tok_s"] == pytest.approx(101.844658)
    assert row["prefill_tok_s"] == pytest.approx(2 * 16 / 0.075333, rel=1e-4)  # S_PP: every prompt's tokens / T_PP
    with pytest.raises(ValueError, match="no JSON row"):
        parse_batched_bench("|    PP |     TG |    B |\n")


def replaying_llama_bench(tmp_path: Path, n_gen: int) -> Path:
    """A stand-in llama-bench that prints the recorded real generation row (n_gen set to what was asked) and
    refuses any other command line; each call is logged."""
    row = next(r for r in json.loads((FIXTURES / "llama-bench.json").read_text()) if r["n_gen"])
    row = {**row, "n_gen": n_gen, "avg_ts": 1000.0, "samples_ts": [1000.0]}
    fake = tmp_path / "llama-bench"
    fake.write_text(
        f'#!/bin/sh\ncase "$*" in *"-p 0 -n {n_gen} -r 1"*) ;; *) exit 3 ;; esac\necho "$*" >> {tmp_path}/calls\n'
        f"cat <<'EOF'\n{json.dumps([row])}\nEOF\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake


def test_paired_decode_alternates_rounds_and_takes_the_median_ratio(tiny_llm, tmp_path):
    fake = replaying_llama_bench(tmp_path, 8)
    r = paired_decode(tiny_llm, fake, tmp_path / "m.gguf", 2, new_tokens=8, rounds=3)
    assert len((tmp_path / "calls").read_text().splitlines()) == 3
    assert r["rounds"] == 3 and r["llama_cpp_decode_tok_s"] == 1000.0
    assert r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"]
    assert r["ratio_median"] == pytest.approx(r["decode_tok_s"] / 1000.0, rel=1e-2)
    tiny_llm.engine.pool.check_idle()


def test_the_real_llama_bench_still_prints_what_is_parsed():
    """Where benchmarks/llama_cpp.py has built llama.cpp and its SmolLM2 copies (~/.cache/trainfer/peers), run the
    real llama-bench: the recorded output above must still be the shape it prints."""
    peers = registry.home() / "peers"
    binary, model = peers / "llama.cpp" / "build" / "bin" / "llama-bench", peers / "smollm2-135m-instruct.Q8_0.gguf"
    if not (binary.exists() and model.exists()):
        pytest.skip("llama.cpp is not built here (benchmarks/llama_cpp.py builds it)")
    rows = llama_bench_rows(binary, model, 1, 8, 4, 1)
    assert [(r["n_prompt"], r["n_gen"]) for r in rows] == [(8, 0), (0, 4)] and all(r["avg_ts"] > 0 for r in rows)


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
