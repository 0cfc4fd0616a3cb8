"""The native decode step (infer/native_decode.py, quant/csrc/kernels.cpp Decoder) against the module path: same
logits for every sequence of a continuous batch, over the paged cache, for fp32 / int8 / int4 weights."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_hf_model
from trainfer.errors import TrainferError
from trainfer.infer import native_decode
from trainfer.infer.engine import Engine
from trainfer.infer.sampling import SamplingParams
from trainfer.io.loader import load_model
from trainfer.quant import native
from trainfer.quant.blocks import quantize_model

pytestmark = pytest.mark.skipif(native.extension() is None, reason="native kernels not built")


def tiny_model(tmp_path, kind: str, weights: str, **overrides):
    make_hf_model(kind, **{"vocab_size": 256, "max_position_embeddings": 512, **overrides}).save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    return model if weights == "float32" else quantize_model(model, weights)


def compare_both_paths(engine: Engine, same_argmax: bool = True) -> tuple[list[float], set[str]]:
    """Run every batch with decoding sequences twice, all through the modules then as the runner does (native
    step, or native step + modules for a mixed batch), from the same cache state; return the largest logit
    difference of each (relative to the logits' scale) and keep the runner's result."""
    runner, diffs, kinds = engine.runner, [], set()
    run = runner.run

    def both(batch, rows):
        if not any(n == 1 and seq.num_computed > 0 for seq, n in batch):
            return run(batch, rows)
        kinds.add("all decode" if all(n == 1 and seq.num_computed > 0 for seq, n in batch) else "mixed")
        pool = runner.pool
        state = [t for t in (pool.k, pool.v, pool.k_scale, pool.v_scale) if t is not None]
        saved = [t.clone() for t in state]
        with torch.inference_mode():
            want = runner._module(batch, rows)
        for t, s in zip(state, saved, strict=True):
            t.copy_(s)
        got = run(batch, rows)
        diffs.append(float((got - want).abs().max() / want.abs().max()))
        assert torch.equal(got.argmax(-1), want.argmax(-1)) or not same_argmax
        return got

    runner.run = both
    return diffs, kinds


@pytest.mark.parametrize("weights", ["float32", "int8", "int4"])
@pytest.mark.parametrize("kind,overrides", [("llama", {}), ("llama", {"tie_word_embeddings": True}),
                                            ("qwen2", {}), ("qwen3", {})],
                         ids=["llama", "tied", "qwen2-bias", "qwen3-qk-norm"])  # fmt: skip
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("prepared", [False, True], ids=["stacked", "fused"])
def test_native_step_equals_the_module_path(tmp_path, weights, kind, overrides, bf16, prepared, monkeypatch):
    """fp32 products: equal up to summation order. bf16 products (more than 4 rows of int8 / int4 weights on a CPU
    with AVX512_BF16): both paths round the same inputs, up to the last bits that differ before rounding. A model
    as handed (its projections stacked) and one prepared at load (fused, split) alike."""
    if bf16 and weights == "float32":
        pytest.skip("bf16 products apply to int8 / int4 weights only: fp32 weights keep fp32 products")
    if bf16 and not native.extension().bf16_gemm:
        pytest.skip("bf16 products need a CPU with AVX512_BF16")
    monkeypatch.setenv("TRAINFER_BF16", "1" if bf16 else "0")
    model = tiny_model(tmp_path, kind, weights, **overrides)
    if prepared:
        native_decode.prepare(model)
    engine = Engine(model, num_blocks=96, block_size=4, max_num_batched_tokens=64)
    assert engine.runner.decoder is not None
    diffs, kinds = compare_both_paths(engine, same_argmax=not bf16)
    shared = list(range(3, 40))  # 9 full blocks shared through the prefix cache by the later prompts
    prompts = [[5, 17, 99], shared, shared + [7, 8], list(range(100, 106)), [200]]
    prompts += [[i, i + 1] for i in range(20, 32)]  # 17 sequences: the batch shrinks past 16 as they finish
    params = [SamplingParams(max_tokens=6 + i % 5, temperature=0, ignore_eos=True) for i in range(len(prompts))]
    engine.run(prompts, params)
    assert kinds == {"all decode", "mixed"}  # max_num_batched_tokens makes later prompts join running decodes
    # int4 decode rows on AVX2 take integer products on the input split into two int8 parts (~16 bits; measured 1.6e-5)
    split = weights == "int4" and native.extension().split_input(2, 1, 64)
    assert len(diffs) >= 8 and max(diffs) < (1e-2 if bf16 else 1e-4 if split else 1e-5), max(diffs)
    engine.pool.check_idle()


def test_many_decoding_rows_take_several_native_steps(tmp_path, monkeypatch):
    """Past MAX_ROWS decoding rows the runner makes one native step per 16 rows (not the module path for all):
    the same logits as the modules; a one-token prompt chunk that samples nothing stays on the module path (the
    native step needs a row to sample: it crashed the process before)."""
    monkeypatch.setenv("TRAINFER_BF16", "0")
    model = tiny_model(tmp_path, "llama", "int8")
    engine = Engine(model, num_blocks=400, block_size=4, max_num_batched_tokens=41)
    diffs, _ = compare_both_paths(engine)
    steps = spy_native_steps(engine)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (int(n),), generator=gen).tolist() for n in torch.randint(1, 30, (40,))]
    engine.run(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert max(steps) == native_decode.MAX_ROWS and len(diffs) >= 12 and max(diffs) < 1e-5, max(diffs)
    engine.pool.check_idle()
    # 16 decoding sequences use the budget but one token a step, which goes to a long prompt: 1-token chunks
    engine = Engine(model, num_blocks=400, block_size=4, max_num_batched_tokens=17)
    steps = spy_native_steps(engine)
    prompts = [[i, i + 1] for i in range(3, 19)] + [list(range(40, 100))]
    done = engine.run(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert all(r[0][-1].finish_reason == "length" for r in done) and max(steps) == native_decode.MAX_ROWS
    engine.pool.check_idle()


def spy_native_steps(engine: Engine) -> list[int]:
    """The sequences in each native step the engine's runner makes; each step must have rows to sample."""
    steps, native_step = [], engine.runner._native_decode

    def spy(items, rows):
        assert rows, "a native step with no row to sample"
        steps.append(len(items))
        return native_step(items, rows)

    engine.runner._native_decode = spy
    return steps


@pytest.mark.parametrize("kv_dtype", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("hidden", [64, 96, 288], ids=["hd16", "hd24", "hd72"])
def test_long_rows_split_along_positions_equal_the_module_path(tmp_path, kv_dtype, hidden):
    """Rows past 1,000 keys: the native step cuts each row's attention into parts of at most 304 positions
    (kernels.cpp attention_parts: whatever the thread count) and merges them; the module path attends in one piece
    (SDPA). Same cache in fp32 or fp16, same logits up to summation order; head size 24 leaves a tail past whole
    registers, 72 a group of 64 values held in registers over a block's positions and a tail. An int8 cache: both
    paths write the same bytes and scales (same IEEE operations), so the logits agree as closely."""
    model = tiny_model(tmp_path, "llama", "float32", hidden_size=hidden, max_position_embeddings=2048)
    engine = Engine(model, num_blocks=800, block_size=4, kv_dtype=kv_dtype, max_num_batched_tokens=2048)
    assert engine.pool.k.dtype == {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}[kv_dtype]
    diffs, kinds = compare_both_paths(engine)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (1200, 1500)]
    engine.run(prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert "all decode" in kinds and len(diffs) >= 4 and max(diffs) < 1e-5, diffs


def test_smaller_caches_hold_more_tokens_at_a_rounding_cost(tmp_path):
    """Same kv_cache_gb: fp16 holds twice the blocks of fp32, int8 (hd 16 + a 4-byte scale per head) 3.2x; the
    logits of a 600-token row stay within each one's rounding of K/V (int8's coarser than fp16's)."""
    model = tiny_model(tmp_path, "llama", "float32", max_position_embeddings=1024)
    kinds = ("fp32", "fp16", "int8")
    engines = {d: Engine(model, kv_cache_gb=2**-8, block_size=4, kv_dtype=d) for d in kinds}
    blocks = {d: e.pool.num_blocks for d, e in engines.items()}
    assert blocks["fp16"] == 2 * blocks["fp32"] and blocks["int8"] == int(blocks["fp32"] * 64 / 20), blocks
    assert all(e.pool.nbytes <= 2**30 * 2**-8 for e in engines.values())
    prompt = torch.randint(3, 256, (600,), generator=torch.Generator().manual_seed(1)).tolist()
    logits: dict[str, list[torch.Tensor]] = {d: [] for d in engines}
    for d, engine in engines.items():
        run = engine.runner.run
        engine.runner.run = lambda batch, rows, run=run, out=logits[d]: out.append(run(batch, rows)) or out[-1]
        engine.run([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    errs = {}
    for d in ("fp16", "int8"):
        pairs = [(a, b) for a, b in zip(logits["fp32"], logits[d], strict=True) if a.numel()]
        assert len(pairs) == 4  # the prompt's last chunk, then 3 decode steps
        errs[d] = max(float((a - b).abs().max() / a.abs().max()) for a, b in pairs)
    assert 0 < errs["fp16"] < errs["int8"] < 5e-2, errs
    with pytest.raises(TrainferError, match="kv_dtype"):
        Engine(model, num_blocks=8, kv_dtype="int3")


def test_int8_rows_round_trip_within_half_a_step():
    """quantize_kv / dequantize_kv: each value within half its row's step (max |x| / 127 / 2), zeros stay zeros."""
    from trainfer.infer.kv_cache import dequantize_kv, quantize_kv

    x = torch.randn(50, 3, 24, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 50)[:, None, None]
    x[0, 0] = 0
    q, scale = quantize_kv(x)
    assert q.dtype == torch.int8 and scale.shape == (50, 3) and int(q.abs().max()) == 127
    back = dequantize_kv(q, scale, torch.float32)
    assert torch.all((back - x).abs() <= scale.unsqueeze(-1) / 2 * (1 + 1e-5))
    assert torch.equal(back[0, 0], torch.zeros(24))


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_prepare_fuses_projections_into_views(tmp_path, weights):
    """At load, q/k/v and gate/up become one matrix each; the modules' weights are views into it, nothing is copied
    and the state dict is unchanged (the fused matrices are not submodules)."""
    model = tiny_model(tmp_path, "llama", weights)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    native_decode.prepare(model)
    attn = model.layers[0].self_attn
    q, k = (attn.q_proj.qweight, attn.k_proj.qweight) if weights == "int8" else (attn.q_proj.weight, attn.k_proj.weight)
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


def test_the_engine_leaves_a_model_it_is_handed_alone(tmp_path):
    """No fusing, splitting or LoRA routing written into the modules: the trainer runs its probe on the model it
    trains, and the fine-tuner's model keeps its own structure."""
    from trainfer.model import lora

    model = tiny_model(tmp_path, "llama", "float32")
    lora.apply_lora(model, lora.LoRAConfig(r=4, targets=("q_proj", "v_proj")), "a")
    structure = [(n, type(m)) for n, m in model.named_modules()]
    storage = {n: p.untyped_storage().data_ptr() for n, p in model.named_parameters()}
    attrs = {n: set(vars(m)) for n, m in model.named_modules()}
    engine = Engine(model, num_blocks=32, block_size=4)
    engine.run([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), adapters=["a", None])
    assert [(n, type(m)) for n, m in model.named_modules()] == structure
    assert {n: p.untyped_storage().data_ptr() for n, p in model.named_parameters()} == storage
    assert {n: set(vars(m)) for n, m in model.named_modules()} == attrs
    assert lora.ROUTING.get() is None  # the routing lived for the forward only


def test_without_the_build_the_module_path_runs(tmp_path, monkeypatch):
    monkeypatch.setattr("trainfer.infer.native_decode.extension", lambda: None)
    model = tiny_model(tmp_path, "llama", "int8")
    engine = Engine(model, num_blocks=32, block_size=4)
    assert engine.runner.decoder is None
    out = engine.run([[5, 6, 7]], [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)])
    assert len(out[0][0]) == 4


def test_the_step_checks_what_it_is_given(tmp_path):
    model = tiny_model(tmp_path, "llama", "float32")
    engine = Engine(model, num_blocks=8, block_size=4)
    pool, hd = engine.pool, model.cfg.head_dim
    cos = sin = torch.zeros(1, hd)
    args = dict(tokens=torch.tensor([5]), tables=torch.tensor([[0]]), lengths=torch.tensor([3]))

    def step(**changes):
        a = {**args, **changes}
        return engine.runner.decoder.step(a["tokens"], cos, sin, pool.k, pool.v, None, None, a["tables"],
                                          a["lengths"], 4, torch.tensor([0]), False)  # fmt: skip

    assert step().shape == (1, 256)
    with pytest.raises(RuntimeError, match="block id"):
        step(tables=torch.tensor([[8]]))
    with pytest.raises(RuntimeError, match="length"):
        step(lengths=torch.tensor([5]))
    with pytest.raises(RuntimeError, match="token id"):
        step(tokens=torch.tensor([256]))
