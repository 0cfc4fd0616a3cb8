"""The commands that fetch and rewrite model files: pull, models, quantize, export, convert, merge, prune."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainfer import registry
from trainfer.cli.flags import arg, default_of
from trainfer.cli.infer import Threads
from trainfer.compress.prune import DEPTH_METRICS, METHODS, SPARSITY_METRICS
from trainfer.compress.prune import prune as prune_model
from trainfer.compress.quality import format_report, quality_report
from trainfer.errors import TrainferError, new_directory
from trainfer.io import peft
from trainfer.io.export import FORMATS, export_model
from trainfer.io.gguf_writer import GGUF_TYPES
from trainfer.io.loader import export_hf, resolve
from trainfer.io.quantized import save_quantized
from trainfer.llm import LLM


@dataclass(kw_only=True)
class Pull:
    """download a model by alias into the cache"""

    name: str = arg(positional=True)
    """alias, e.g. smollm2-135m-instruct"""


def pull(s: Pull) -> None:
    print(registry.pull(s.name))


@dataclass(kw_only=True)
class Models:
    """list model aliases and what is cached"""


def models(s: Models) -> None:
    for name, path in registry.cached_models():
        where = str(path) if path else "not pulled (trainfer pull " + name + ")"
        print(f"{name:28s} {registry.ALIASES[name].description}\n{'':28s} {where}")


@dataclass(kw_only=True)
class Quantize(Threads):
    """write an int8 / int4 copy of a model that loads without re-quantizing"""

    model: str = arg(positional=True)
    """an alias, a .gguf file, a Hugging Face directory or a training run"""
    to: str | None = arg(None, choices=("int8", "int4"))
    """int8: Q8_0 blocks; int4: Q4_1 blocks"""
    out: str | None = None
    """a new directory to write"""
    report: bool = False
    """print perplexity, top-1 and greedy agreement against fp32 on held-out Shakespeare and HumanEval (for --to,
    or for int8 and int4)"""
    positions: int = default_of(quality_report, "positions")
    """tokens scored per corpus for --report"""


def quantize(s: Quantize) -> None:
    if s.report:
        weights = ("float32", s.to) if s.to else ("float32", "int8", "int4")
        print(format_report(s.model, quality_report(s.model, weights, positions=s.positions)))
        if not s.out:
            return
    if not (s.to and s.out):
        raise TrainferError("quantize needs --to and --out (or --report alone for the quality table)")
    out = new_directory(s.out)
    llm = LLM.load(s.model, dtype=s.to, num_blocks=2)
    print(save_quantized(llm.model, llm.tokenizer, out))


@dataclass(kw_only=True)
class Export:
    """write a model for another engine: llama.cpp (gguf), onnxruntime, transformers"""

    model: str = arg(positional=True)
    """an alias, a .gguf file, a Hugging Face directory, a training run or an adapter"""
    to: str = arg(choices=FORMATS)
    """gguf: one llama.cpp file; onnx: a decoder with KV-cache inputs and outputs; hf: safetensors"""
    out: Path
    """the file (gguf, onnx) or new directory (hf) to write"""
    type: str = arg(default_of(export_model, "type"), choices=tuple(GGUF_TYPES))
    """weights: gguf takes every type, onnx F32, hf F32, F16 or BF16"""


def export(s: Export) -> None:
    print(export_model(s.model, s.to, s.out, s.type))


@dataclass(kw_only=True)
class Convert:
    """export a model as a Hugging Face directory (the same as `export --to hf`)"""

    model: str = arg(positional=True)
    """an alias, a .gguf file or a Hugging Face directory"""
    to: str = arg(choices=("hf",))
    """target format (hf: config.json + safetensors)"""
    out_dir: Path = arg(positional=True)
    """a new directory to write"""
    dtype: str = arg("auto", choices=("auto", "float32", "bfloat16"))
    """the weights written (auto: float32)"""


def convert(s: Convert) -> None:
    print(export_model(s.model, s.to, s.out_dir, "BF16" if s.dtype == "bfloat16" else "F32"))


@dataclass(kw_only=True)
class Merge:
    """fold a LoRA adapter into its base: a plain Hugging Face model directory"""

    base: str | None = arg(None, positional=True)
    """the base model (default: the one the adapter names)"""
    adapter: str = arg(positional=True)
    """a PEFT adapter directory or a LoRA fine-tune's run directory"""
    out: Path
    """the new model directory"""
    dtype: str = arg(default_of(export_hf, "dtype"), choices=("float32", "bfloat16"))
    """the merged weights"""


def merge(s: Merge) -> None:
    if not peft.is_adapter(resolve(s.adapter)):
        raise TrainferError(f"{s.adapter} is not a LoRA adapter (no adapter_config.json): nothing to merge")
    print(export_hf(s.adapter, s.out, s.dtype, base=s.base))


@dataclass(kw_only=True)
class Prune:
    """a smaller model: drop blocks (depth), narrow MLPs / heads (width), or sparsify"""

    model: str = arg(positional=True)
    """an alias, a .gguf, a model directory or a training run"""
    out: str
    """the new model directory"""
    method: str = arg(default_of(prune_model, "method"), choices=METHODS)
    """what to remove"""
    ratio: float = default_of(prune_model, "ratio")
    """share of the blocks' parameters to remove"""
    metric: str | None = arg(None, choices=(*DEPTH_METRICS, "activation", *SPARSITY_METRICS))
    """importance: depth influence|loss (influence), width activation, sparsity wanda|magnitude (wanda)"""
    kv_heads: int | None = None
    """width: key-value head groups to keep per layer (default: all)"""
    data: str = default_of(prune_model, "data")
    """calibration text: a corpus name, file, directory or glob"""
    windows: int = default_of(prune_model, "n_windows")
    """calibration windows"""
    seq_len: int = default_of(prune_model, "seq_len")
    """tokens per calibration window"""
    seed: int = default_of(prune_model, "seed")
    """which calibration windows"""


def prune(s: Prune) -> None:
    report = prune_model(s.model, s.out, s.method, s.ratio, s.metric, s.kv_heads, s.data, s.windows, s.seq_len,
                         s.seed)  # fmt: skip
    print(report.summary())
    before, after = report.scores["calibration_loss_before"], report.scores["calibration_loss_after"]
    print(f"calibration loss {before:.4f} -> {after:.4f} nats/token; wrote {s.out} (see prune.json)")
    print(f"recover what was lost: trainfer distill --teacher {s.model} --student {s.out} --data ... --out RUN")
