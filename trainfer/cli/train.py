"""The commands that make a model: prepare data, train, fine-tune, distill, evaluate, and the quickstart."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainfer.cli.flags import arg, default_of
from trainfer.cli.infer import Threads
from trainfer.compress.answers import teacher_answers
from trainfer.compress.distill import distill as distill_run
from trainfer.compress.distill import load_distill_config
from trainfer.data.from_logs import Filters, dataset_from_logs
from trainfer.data.prepare import prepare as prepare_data
from trainfer.errors import TrainferError
from trainfer.io.run_dir import list_checkpoints, read_state
from trainfer.llm import WEIGHTS
from trainfer.model.config import PRESETS
from trainfer.quickstart import quickstart as quickstart_run
from trainfer.reason.grpo import grpo as grpo_run
from trainfer.reason.grpo import load_grpo_config
from trainfer.reason.prefs import make_prefs
from trainfer.train.config import load_config
from trainfer.train.dpo import dpo as dpo_run
from trainfer.train.dpo import load_dpo_config
from trainfer.train.evaluate import evaluate_chat, evaluate_model
from trainfer.train.finetune import finetune as finetune_run
from trainfer.train.finetune import load_finetune_config
from trainfer.train.trainer import train as train_run


@dataclass(kw_only=True)
class Prepare:
    """train a tokenizer and pack text into token shards for training"""

    source: list[str] = arg(metavar="SOURCE")
    """shakespeare | FILE | DIR | GLOB | FILE.jsonl:FIELD (repeatable)"""
    out: Path
    """a new directory for tokenizer.json, train.bin, val.bin, meta.json"""
    tokenizer: str = default_of(prepare_data, "tokenizer")
    """bpe (trained here), char, or a model whose tokenizer to reuse"""
    vocab_size: int = default_of(prepare_data, "vocab_size")
    """for bpe"""
    val_fraction: float = default_of(prepare_data, "val_fraction")
    """share of documents held out"""
    seed: int = default_of(prepare_data, "seed")
    """which documents are held out"""
    split: str = arg(default_of(prepare_data, "split"), choices=("documents", "contiguous"))
    """hold out whole documents, or the end of the concatenated text (nanoGPT's way)"""


def prepare(s: Prepare) -> None:
    stats = prepare_data(s.source, s.out, s.tokenizer, s.vocab_size, s.val_fraction, s.seed, s.split)
    print(
        f"{stats.documents} documents ({stats.train_documents} train / {stats.val_documents} val), "
        f"{stats.train_tokens:,} train + {stats.val_tokens:,} val tokens, vocabulary {stats.vocab_size}, "
        f"{stats.bytes_per_token:.2f} bytes per token -> {s.out}"
    )


@dataclass(kw_only=True)
class RunSettings:
    """What `train`, `finetune` and `distill` share: a settings file, `--set` overrides, a seed and resuming."""

    config: str | None = None
    """a TOML file of settings (see docs/training.md, docs/finetune.md)"""
    set: list[str] = arg([], metavar="KEY=VALUE")
    """any setting (repeatable)"""
    seed: int | None = None
    """random seed (default: the settings')"""
    resume: bool = False
    """continue the run in --out from its latest checkpoint"""

    def resumed(self, out: str | None) -> dict[str, Any]:
        """The run's own settings, so `--resume --out DIR` is enough; anything given again must agree."""
        found = list_checkpoints(Path(out)) if self.resume and out else []
        return read_state(found[-1])["config"] if found else {}


@dataclass(kw_only=True)
class Train(RunSettings):
    """pretrain a model on prepared shards (resumable; torchrun for DDP/FSDP)"""

    data: str | None = None
    """a directory written by trainfer prepare"""
    out: str | None = None
    """the run directory: checkpoints/, metrics.jsonl, loss.png (default runs/run)"""
    preset: str | None = None
    """model size and its run defaults: tiny, small, base (default tiny)"""


def train(s: Train) -> None:
    cfg = load_config(s.config, s.set, base=s.resumed(s.out), data=s.data, out_dir=s.out, preset=s.preset,
                      seed=s.seed)  # fmt: skip
    result = train_run(cfg, resume=s.resume)
    if result.best_checkpoint is None:  # not rank 0 of a distributed run
        return
    val = f", val loss {result.val_loss:.4f} ({result.val_bpb:.3f} bits/byte)" if result.val_loss is not None else ""
    print(
        f"{result.steps} steps, {result.tokens:,} tokens in {result.elapsed_s:.0f} s "
        f"({result.tokens_per_s:,.0f} tokens/s, MFU {result.mfu:.1%} against a {result.peak_source} peak){val}"
        f"{' (stopped early)' if result.stopped_early else ''}\nbest checkpoint: {result.best_checkpoint}"
    )


@dataclass(kw_only=True)
class Quickstart:
    """prepare, train, validate and run a small model in ~5 CPU minutes"""

    out: str = default_of(quickstart_run, "out")
    """where the run and report.md go (replaced each time)"""
    steps: int = default_of(quickstart_run, "steps")
    """training steps (~3 minutes on 2 cores at the default)"""


def quickstart(s: Quickstart) -> None:
    done = quickstart_run(s.out, s.steps)
    print()
    print(done.report.read_text())
    print(f"report card: {done.report} (loss curve: {done.out_dir / 'loss.png'})")
    run = done.out_dir / "run"
    print(f"in a browser: `trainfer ui {run}` (curves, samples, probe), `trainfer serve {run}` (chat with it too)")


@dataclass(kw_only=True)
class Finetune(RunSettings):
    """adapt a pre-trained model to your conversations (full or LoRA; resumable)"""

    model: str | None = arg(None, positional=True)
    """the base: an alias, a .gguf, a model directory or a run (not on --resume)"""
    data: str | None = None
    """JSONL of {'messages': [...]} or {'prompt', 'completion'} lines"""
    val: str | None = None
    """held-out JSONL (default: hold out val_fraction of --data)"""
    out: str | None = None
    """the run directory: checkpoints/, metrics.jsonl, loss.png, report.md"""
    lora: bool = False
    """train a LoRA adapter (PEFT format) on the frozen base"""


def finetune(s: Finetune) -> None:
    _tune(s, load_finetune_config, finetune_run)


@dataclass(kw_only=True)
class Dpo(Finetune):
    """preference-tune a model on pairs of answers, one preferred (DPO; full or LoRA; resumable)"""

    data: str | None = None
    """JSONL of {'prompt', 'chosen', 'rejected'} lines (prompt as text or messages)"""
    val: str | None = None
    """held-out pairs (default: hold out val_fraction of --data)"""


def dpo(s: Dpo) -> None:
    _tune(s, load_dpo_config, dpo_run)


@dataclass(kw_only=True)
class Grpo(RunSettings):
    """reinforce a model on problems whose answers can be checked (GRPO; full or LoRA; resumable)"""

    model: str | None = arg(None, positional=True)
    """the starting model: an alias, a .gguf, a model directory or a run (not on --resume)"""
    task: str | None = None
    """add, chain-sum, mul, compare, or rg:NAME[:key=value,...] (a reasoning-gym dataset, graded by its
    score_answer)"""
    data: str | None = None
    """instead of --task: JSONL of {'prompt' or 'messages', 'answer'} lines"""
    reward: str | None = None
    """module:function or file.py:function scoring (prompt, completion, answer) -> float (default: the task's
    checker, 1 right / 0 wrong)"""
    out: str | None = None
    """the run directory: checkpoints/, metrics.jsonl (rewards, lengths, rollout and update time), report.md"""
    lora: bool = False
    """train a LoRA adapter (PEFT format) on the frozen base"""


def grpo(s: Grpo) -> None:
    values: dict[str, Any] = {"base_model": s.model, "task": s.task, "data": s.data, "reward": s.reward,
                              "out_dir": s.out}  # fmt: skip
    if s.lora:
        values["lora"] = True
    cfg = load_grpo_config(s.config, s.set, base=s.resumed(s.out), seed=s.seed, **values)
    result = grpo_run(cfg, resume=s.resume)
    print(result.card)


def _tune(s: Finetune, load, run) -> None:
    values: dict[str, Any] = {"base_model": s.model, "data": s.data, "val_data": s.val, "out_dir": s.out}
    if s.lora:
        values["lora"] = True
    cfg = load(s.config, s.set, base=s.resumed(s.out), seed=s.seed, **values)
    result = run(cfg, resume=s.resume)
    if result.card is not None:
        print(result.card)


@dataclass(kw_only=True)
class Distill(RunSettings):
    """train a student (a pruned model, or a preset) on a teacher's distributions"""

    teacher: str | None = None
    """the model to imitate: an alias, a .gguf, a model directory or a run"""
    student: str | None = None
    """the model to train: a directory (e.g. from prune) or a preset (tiny, small)"""
    data: str | None = None
    """text (corpus name, file, directory) or a directory prepared with the teacher's tokenizer"""
    out: str
    """the run directory"""


def distill(s: Distill) -> None:
    base = s.resumed(s.out)
    values: dict[str, Any] = {"teacher": s.teacher, "out_dir": s.out, "data": s.data}
    if s.student in PRESETS:
        values["preset"] = s.student  # a fresh student of that shape, with the teacher's vocabulary
    elif s.student:
        values["student"] = s.student
    if s.data and not base and not (Path(s.data) / "meta.json").exists():
        values["data"] = str(_teacher_tokenized(s.data, s.teacher, Path(s.out) / "data"))
    cfg = load_distill_config(s.config, s.set, base=base, seed=s.seed, **values)
    result = distill_run(cfg, resume=s.resume)
    if result.best_checkpoint is None:
        return
    val = f", held-out loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"{result.steps} steps, {result.tokens:,} tokens in {result.elapsed_s:.0f} s{val}")
    print(f"the student: {result.best_checkpoint} (best held-out loss)")


def _teacher_tokenized(source: str, teacher: str, out: Path) -> Path:
    """Text (a corpus name, files, a directory) as token shards in the teacher's tokenizer, kept in the run."""
    if not (out / "meta.json").exists():
        stats = prepare_data([source], out, tokenizer=teacher)
        print(f"prepared {source}: {stats.train_tokens:,} training + {stats.val_tokens:,} held-out tokens -> {out}")
    return out


@dataclass(kw_only=True)
class Eval(Threads):
    """held-out loss, perplexity, bits per byte and a memorization probe"""

    model: str = arg(positional=True)
    """a training run directory, a checkpoint, an alias or a Hugging Face directory"""
    data: str | None = None
    """a prepared directory tokenized with the model's tokenizer"""
    chat_data: str | None = None
    """JSONL conversations: assistant-token loss on them (fine-tuning's measure)"""
    exact: bool = False
    """with --chat-data: greedy answers vs the references"""
    max_tokens: int = default_of(evaluate_model, "max_tokens")
    """tokens scored per split"""
    seq_len: int | None = None
    """window length (default: 256, capped by the model's context)"""
    passages: int = default_of(evaluate_model, "passages")
    """probe passages per split; 0 = no probe"""
    prefix_tokens: int = default_of(evaluate_model, "prefix_tokens")
    """probe: tokens of a passage given"""
    continuation_tokens: int = default_of(evaluate_model, "continuation_tokens")
    """probe: tokens of the passage's continuation compared"""
    dtype: str = arg(default_of(evaluate_model, "dtype"), choices=WEIGHTS)
    """the weights to evaluate"""


def evaluate(s: Eval) -> None:
    if bool(s.data) == bool(s.chat_data):
        raise TrainferError("eval needs --data DIR (text) or --chat-data FILE.jsonl (conversations), one of them")
    if s.chat_data:
        print(evaluate_chat(s.model, s.chat_data, s.exact, s.dtype).summary())
        return
    report = evaluate_model(s.model, s.data, s.max_tokens, s.seq_len, passages=s.passages,
                            prefix_tokens=s.prefix_tokens, continuation_tokens=s.continuation_tokens,
                            dtype=s.dtype)  # fmt: skip
    print(report.summary())


@dataclass(kw_only=True)
class FromLogs:
    """a fine-tuning JSONL from `serve --log-requests` (filtered, redacted)"""

    dir: Path = arg(positional=True)
    """the directory given to --log-requests"""
    out: Path
    """the JSONL to write (messages / prompt+completion lines)"""
    finish_reason: list[str] = arg(list(Filters.finish_reasons))
    """keep answers that ended so (repeatable)"""
    filters: Filters = arg(Filters(), only=("min_chars", "max_chars", "only_rated_up", "keep_rated_down", "routed"))
    force: bool = False
    """replace --out if it exists"""


@dataclass(kw_only=True)
class Prefs:
    """preference pairs (for dpo) from a model's own samples, scored by a task's checker or your function"""

    model: str = arg(positional=True)
    """the model that samples: an alias, a .gguf, a model directory or a run"""
    out: Path
    """the JSONL to write: {'prompt': [messages], 'chosen', 'rejected', 'scores'} lines"""
    task: str | None = None
    """add, chain-sum, mul, compare, or rg:NAME[:key=value,...] (as trainfer grpo)"""
    data: str | None = None
    """instead of --task: JSONL of {'prompt' or 'messages', 'answer'} lines"""
    reward: str | None = None
    """module:function or file.py:function scoring (prompt, completion, answer) -> float"""
    count: int = default_of(make_prefs, "count")
    """problems drawn from --task"""
    n: int = default_of(make_prefs, "n")
    """samples per problem; the best and the worst make the pair"""
    temperature: float = default_of(make_prefs, "temperature")
    """of the samples (1: the model's own distribution, so answers differ)"""
    max_tokens: int = default_of(make_prefs, "max_tokens")
    """the longest answer sampled"""
    seed: int = default_of(make_prefs, "seed")
    """which problems and samples (a seed's problems lie apart from any other's)"""
    force: bool = False
    """replace --out if it exists"""


@dataclass(kw_only=True)
class Answers:
    """a model's own chat answers to your prompts, as distillation data (for a speculative draft: docs/engine.md)"""

    model: str = arg(positional=True)
    """the model that answers: an alias, a .gguf, a model directory or a run"""
    prompts: Path
    """a text file (one user message per line) or JSONL of {'prompt'} or {'messages'} lines"""
    out: Path
    """the JSONL to write: {'text': the whole transcript, 'prompt', 'answer', 'finish_reason'} lines"""
    max_tokens: int = default_of(teacher_answers, "max_tokens")
    """the longest answer"""
    temperature: float = default_of(teacher_answers, "temperature")
    """0: greedy, the answers a greedy request gets"""
    seed: int = default_of(teacher_answers, "seed")
    """of sampled answers"""
    dtype: str = arg(default_of(teacher_answers, "dtype"), choices=WEIGHTS)
    """weights the model answers with (as trainfer generate --dtype)"""
    force: bool = False
    """replace --out if it exists"""


def dataset_answers(s: Answers) -> None:
    report = teacher_answers(s.model, s.prompts, s.out, s.max_tokens, s.temperature, s.seed, s.dtype, s.force)
    print(report.summary())
    print(f"wrote {report.prompts} transcripts to {s.out} (distill with --data {s.out}:text)")


def dataset_prefs(s: Prefs) -> None:
    report = make_prefs(s.model, s.out, s.task or "", s.data or "", s.reward or "", s.count, s.n, s.temperature,
                        s.max_tokens, seed=s.seed, force=s.force)  # fmt: skip
    print(report.summary())
    print(f"wrote {report.pairs} pairs to {s.out}")


def dataset_from_logs_cmd(s: FromLogs) -> None:
    filters = dataclasses.replace(s.filters, finish_reasons=tuple(s.finish_reason))
    report = dataset_from_logs(s.dir, s.out, filters, s.force)
    print(report.summary())
    print(f"wrote {report.kept} examples to {s.out}")
