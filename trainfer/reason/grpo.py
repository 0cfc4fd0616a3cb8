"""Reinforcement learning with verifiable rewards: GRPO on the fine-tuning loop, rollouts on trainfer's engine.

    trainfer grpo smollm2-135m-instruct --task chain-sum --out runs/rl --lora
    trainfer grpo MODEL --data prompts.jsonl --reward my_rewards:score --out runs/rl

Each step takes `prompts_per_step` problems and draws `group_size` samples of each from the engine: one request
with n samples, so each prompt is prefilled once, on the policy's own weights (the Transformer the optimizer
updates in place: no copy per step, the prefix cache emptied after every update). Every sample gets a reward:
1 or 0 from the task's checker (a reasoning-gym dataset's own `score_answer` for `rg:NAME`), or a user's
function. Advantages are the rewards less their group's mean (divided by the group's standard deviation unless
`scale_rewards` says otherwise); the loss is the clipped-ratio policy gradient over the completion tokens, with
a KL penalty to the starting weights when `beta` > 0. Each group is one micro-batch of the step.

Choices, as TRL's GRPOTrainer makes them (tests/reason/test_grpo.py checks the loss against it): one optimizer
step per batch of rollouts (`num_iterations` 1, so the ratio is 1 in value and the clip bounds nothing until
samples are reused; it is kept so the gradient is the PPO-style one), `epsilon` 0.2, `beta` 0, `scale_rewards`
"group", and `loss_type` "dapo": the step's summed token losses over its completion tokens, so every token weighs
the same whatever its sequence's length. "grpo" (each sequence's mean, then their mean: short answers weigh
more per token) and "dr_grpo" (the sum over `group_size * prompts_per_step * max_completion_tokens`, Dr. GRPO's
constant) are the other two. The KL term is the k3 estimate, exp(ref - logp) - (ref - logp) - 1 per token, times
the ratio.

It sits in reason/ rather than train/ because its rewards are reason/'s tasks and verifiers, a room above train/.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainfer.errors import TrainferError
from trainfer.infer.engine import Engine, TokenEvent
from trainfer.infer.sampling import SamplingParams
from trainfer.io.tokenizer import Tokenizer
from trainfer.model import lora
from trainfer.reason.extract import EXTRACTORS
from trainfer.reason.strategies import COT
from trainfer.reason.tasks import Problem, make
from trainfer.train import chat_data
from trainfer.train.config import load_config
from trainfer.train.distributed import shutdown
from trainfer.train.finetune import FineTuner
from trainfer.train.finetune_config import FineTuneConfig
from trainfer.train.metrics import read_metrics

LOSSES = ("dapo", "grpo", "dr_grpo")
SCALES = ("group", "batch", "none")
AUTO_LR = {True: 5e-4, False: 1e-6}  # LoRA, full (TRL's default): docs/reason.md, GRPO
SEED_SPACING = 1 << 32  # a run's seed s draws its problems from seed s * SEED_SPACING: apart from any other run's
HELDOUT_SEED = 1_000_003  # ... and its held-out problems from there + HELDOUT_SEED (seed 0: 0 and 1,000,003)
ADAPTER = "default"  # the name FineTuner's apply_lora gives the adapter it trains
MIN_STEPS = 20  # fewer optimizer steps than this move a policy too little to measure; the plan warns


@dataclass
class GRPOConfig(FineTuneConfig):
    task: str = ""  # add | chain-sum | mul | compare | rg:NAME[:key=value,...]; or leave it empty and give data
    reward: str = ""  # module:function or file.py:function, called (prompt, completion, answer) -> float
    template: str = "direct"  # direct: the question as asked | cot: "think step by step" | a text with {question}
    digits: int = 2  # operand digits of the built-in tasks
    train_problems: int = 2000  # problems drawn from the task (held-out ones excluded)
    eval_problems: int = 100  # held-out problems (another seed), answered greedily at each evaluation
    group_size: int = 8  # samples per prompt (TRL's num_generations)
    prompts_per_step: int = 4
    max_completion_tokens: int = 64
    temperature: float = 1.0  # of the rollouts; evaluation is greedy
    top_p: float = 1.0
    beta: float = 0.0  # KL penalty to the starting weights (0: none, TRL's default; DeepSeek-R1 used 0.001)
    epsilon: float = 0.2  # the ratio's clip
    loss_type: str = "dapo"
    scale_rewards: str = "group"  # group | batch (one std over the step) | none (Dr. GRPO: mean-centred only)
    skip_uniform_groups: bool = True  # beta 0: no forward / backward for groups whose samples scored alike (exact)
    max_steps: int = 60
    eval_every: int = 10
    ckpt_every: int = 20
    log_every: int = 1
    warmup_steps: int = 0
    sample_tokens: int = 0  # the held-out accuracy is the measure; its first answer goes in the eval record

    def checks(self) -> dict[str, bool]:
        return {**super().checks(), "group_size": self.group_size >= 2, "prompts_per_step": self.prompts_per_step >= 1,
                "max_completion_tokens": self.max_completion_tokens >= 1, "temperature": self.temperature > 0,
                "top_p": 0 < self.top_p <= 1, "beta": self.beta >= 0, "epsilon": 0 < self.epsilon < 1,
                "train_problems": self.train_problems >= 1, "eval_problems": self.eval_problems >= 0,
                "general_share": self.general_share == 0, "neftune_alpha": self.neftune_alpha == 0}  # fmt: skip

    def choices(self) -> dict[str, tuple[str, ...]]:
        return {**super().choices(), "loss_type": LOSSES, "scale_rewards": SCALES}


def load_grpo_config(path: str | None, overrides: list[str], base: dict[str, Any] | None = None,
                     **values: Any) -> GRPOConfig:  # fmt: skip
    return load_config(path, overrides, base=base, cls=GRPOConfig, **values)


# ---- prompts and rewards ----------------------------------------------------------------------------------


@dataclass
class Prompt:
    """One problem as the model sees it: its token ids, its text (for a reward function) and its checker."""

    ids: list[int]
    text: str
    problem: Problem
    messages: list[dict] | None = None  # as asked, for a chat model (None: `text` is raw)


def render(problem: Problem, tokenizer: Tokenizer, template: str, messages: list[dict] | None = None) -> Prompt:
    """The problem in the model's chat template (raw text for a base model without one)."""
    if messages is None:
        fmt = COT[problem.kind] if template == "cot" else "{question}" if template == "direct" else template
        messages = [{"role": "user", "content": fmt.format(question=problem.question)}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages)
        return Prompt(tokenizer.encode(text, add_bos=False), text, problem, messages)
    text = "\n".join(m["content"] for m in messages) + "\n"
    return Prompt(tokenizer.encode(text), text, problem)


def problems_of(task: str, data: str, count: int, held: int, seed: int, digits: int = 2,
                ) -> tuple[list[Problem], list[Problem], list[list[dict]] | None]:  # fmt: skip
    """Training and held-out problems (and, from a data file, each one's messages, training first). A task's
    held-out problems come from another seed, and any training problem asked the same way is dropped (small tasks
    repeat themselves). Seeds are spread apart first: reasoning-gym's seed s draws its items from s, s + 1, ...,
    so runs with seeds 0 and 1 would share all but one problem. A data file holds out a tenth from 20 lines up
    (`chat_data.split`)."""
    if task:
        base = seed * SEED_SPACING
        heldout = make(task, held, base + HELDOUT_SEED, digits) if held else []
        seen = {p.question for p in heldout}
        train = [p for p in make(task, count, base, digits) if p.question not in seen]
        if not train:
            raise TrainferError(f"task {task!r}: every training problem is also a held-out one; raise digits")
        return train, heldout, None
    if not data:
        raise TrainferError("nothing to learn from: pass --task NAME or --data PROMPTS.jsonl")
    records = [r for _, r in chat_data.read_jsonl(data, check_prompt)]
    messages = [r.get("messages") or [{"role": "user", "content": r["prompt"]}] for r in records]
    problems = [Problem(m[-1]["content"], str(r.get("answer", "")), kind_of(str(r.get("answer", ""))))
                for m, r in zip(messages, records, strict=True)]  # fmt: skip
    order = list(range(len(problems)))
    train_i, held_i = chat_data.split(order, 0.1 if held and len(order) >= 20 else 0.0, seed)
    return [problems[i] for i in train_i], [problems[i] for i in held_i], [messages[i] for i in train_i + held_i]


def check_prompt(record: Any, where: str) -> None:
    if not isinstance(record, dict) or not ("prompt" in record or "messages" in record):
        raise TrainferError(f"{where}: expected an object with 'prompt' (text) or 'messages', and optionally 'answer'")
    if "messages" in record:
        chat_data.check_record({"messages": [*record["messages"], {"role": "assistant", "content": "x"}]}, where)
    elif not isinstance(record["prompt"], str) or not record["prompt"].strip():
        raise TrainferError(f"{where}: 'prompt' must be non-empty text")


def kind_of(answer: str) -> str:
    return "number" if re.fullmatch(r"-?\d+(\.\d+)?", answer) else "line"


def load_reward(spec: str) -> Callable[..., Any]:
    """A user's reward function from `module:function` (importable, or a path to a .py file)."""
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise TrainferError(f"reward {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            if not path.is_file():
                raise TrainferError(f"reward {spec!r}: no such file {path}")
            found = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # the working directory, as `python -m` would have it
            module = importlib.import_module(module_name)
    except TrainferError:
        raise
    except Exception as e:  # a user's module failing to import is their error to see, without our traceback
        raise TrainferError(f"reward {spec!r}: cannot import {module_name}: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise TrainferError(f"reward {spec!r}: {module_name} has no function {name!r}")
    return fn


def task_reward(prompt: Prompt, completion: str) -> float:
    """1 if the answer read from the completion is right, else 0."""
    return float(prompt.problem.correct(EXTRACTORS[prompt.problem.kind](completion)))


def score(reward_fn: Callable[..., Any] | None, prompt: Prompt, completion: str) -> float | None:
    """A sample's reward: the task's checker, or the user's function called (prompt text, completion, answer or
    None); None when that function raises or returns no finite number (the caller scores it 0 and counts it)."""
    if reward_fn is None:
        return task_reward(prompt, completion)
    try:
        value = float(reward_fn(prompt.text, completion, prompt.problem.answer or None))
    except Exception:  # the user's code: any failure is that sample's, never the run's
        return None
    return value if math.isfinite(value) else None


def advantages(rewards: Tensor, scale: str) -> Tensor:
    """(P, G) rewards -> advantages: less the group's mean, over the group's (or the batch's) unbiased standard
    deviation + 1e-4 (TRL's), or not divided ("none"). A group whose samples all scored alike teaches nothing."""
    centred = rewards - rewards.mean(1, keepdim=True)
    if scale == "none":
        return centred
    std = rewards.std(1, keepdim=True) if scale == "group" else rewards.std().expand_as(rewards)
    return centred / (std + 1e-4)


# ---- the objective ----------------------------------------------------------------------------------------


def completion_logps(model, batch: dict[str, Tensor]) -> Tensor:
    """(B, C) log-probabilities of each completion token (0 past a completion's end), prompts shared in width."""
    raw = getattr(model, "module", model)
    h = raw.hidden_states(batch["inputs"], batch["positions"], None)  # plain causal: padding only follows
    sel = batch["mask"]
    logp = -F.cross_entropy(raw.lm_head(h[:, -sel.shape[1] :][sel]).float(), batch["targets"][sel], reduction="none")
    return torch.zeros(sel.shape, device=logp.device, dtype=logp.dtype).masked_scatter(sel, logp)


def grpo_loss(
    logps: Tensor, old: Tensor, adv: Tensor, mask: Tensor, epsilon: float, beta: float = 0.0,
    ref: Tensor | None = None, loss_type: str = "dapo", normalizer: float = 1.0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The micro-batch's share of the step's loss, and its summed per-token KL (0 without a reference).

    logps, old, ref, mask: (B, C); adv: (B,). normalizer: the step's completion tokens (dapo), its sequences
    (grpo), or its sequences times max_completion_tokens (dr_grpo)."""
    ratio = torch.exp(logps - old)
    a = adv[:, None]
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)
    kl = torch.zeros_like(logps)
    if ref is not None:
        kl = torch.exp(ref - logps) - (ref - logps) - 1
        if beta:  # times the ratio (1 in value): the unbiased reverse-KL gradient (DeepSeek-V3.2; TRL's default)
            per_token = per_token + beta * kl * ratio
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).sum() / normalizer
    elif loss_type in ("dapo", "dr_grpo"):
        loss = (per_token * m).sum() / normalizer
    else:
        raise TrainferError(f"unknown loss_type {loss_type!r}: choose from {', '.join(LOSSES)}")
    return loss, (kl.detach() * m).sum()


def group_rows(prompt: list[int], completions: list[list[int]], adv: list[float], pad: int) -> dict[str, Tensor]:
    """A group's rows: the shared prompt, each completion after it, right-padded (the mask covers real tokens)."""
    width = max(1, max(len(c) for c in completions))
    ids = torch.tensor([prompt + c + [pad] * (width - len(c)) for c in completions], dtype=torch.long)
    mask = torch.tensor([[j < len(c) for j in range(width)] for c in completions])
    return {"inputs": ids[:, :-1], "targets": ids[:, len(prompt) :], "mask": mask,
            "positions": torch.arange(ids.shape[1] - 1).expand(len(completions), -1),
            "advantages": torch.tensor(adv, dtype=torch.float32)}  # fmt: skip


# ---- the run -------------------------------------------------------------------------------------------


@dataclass
class Group:
    """One prompt's samples after their rewards: the micro-batch a group trains as."""

    prompt: Prompt
    completions: list[list[int]]
    rewards: list[float]
    advantages: list[float] = field(default_factory=list)


class GRPOTrainer(FineTuner):
    """The fine-tuning run with rollouts for data: owns the problems (training and held out), the engine that
    samples from the policy being trained, the reward function and the step's rollout record (rewards, lengths,
    time), logged beside the loop's own. It never copies the weights: the engine runs on the same Transformer."""

    cfg: GRPOConfig

    def _load_data(self) -> None:
        cfg = self.cfg
        if cfg.data:
            cfg.data = str(Path(cfg.data).resolve())
        self.reward_fn = load_reward(cfg.reward) if cfg.reward else None
        tokenizer = self._load_base()
        train, held, messages = problems_of(cfg.task, cfg.data, cfg.train_problems, cfg.eval_problems, cfg.seed,
                                            cfg.digits)  # fmt: skip
        n = len(train)
        self.prompts = [render(p, tokenizer, cfg.template, messages[i] if messages else None)
                        for i, p in enumerate(train)]  # fmt: skip
        self.heldout = [render(p, tokenizer, cfg.template, messages[n + i] if messages else None)
                        for i, p in enumerate(held)]  # fmt: skip
        if not self.reward_fn and any(not p.problem.answer for p in self.prompts):
            raise TrainferError(f"{cfg.data}: a line without 'answer' needs --reward module:function to score it")
        self.general, self.val_rows, self.examples = None, None, (len(self.prompts), len(self.heldout))
        cfg.batch_size, cfg.grad_accum = cfg.group_size, cfg.prompts_per_step  # a micro-batch is one group
        longest = max(len(p.ids) for p in self.prompts + self.heldout)
        cfg.seq_len = longest + cfg.max_completion_tokens
        if cfg.seq_len > self.base_cfg.max_seq_len:
            raise TrainferError(f"a prompt of {longest} tokens + max_completion_tokens {cfg.max_completion_tokens} "
                                f"is longer than the model's context ({self.base_cfg.max_seq_len})")  # fmt: skip
        if not cfg.lr:
            cfg.lr = AUTO_LR[cfg.lora]
        if self.dist.world > 1:
            raise TrainferError("grpo runs in one process (its rollouts use this process's engine)")
        if self.dist.main and self.resume_from is None:
            print(self.plan(), flush=True)
        self.val_bytes_per_token = None
        self.flops_per_token = self.base_cfg.training_flops_per_token(cfg.seq_len) * (4 / 6 if cfg.lora else 1)
        self.record: dict[str, Any] = {}
        self.failures = 0  # samples whose reward function raised or returned no number, in this process

    def plan(self) -> str:
        cfg, (n_train, n_held) = self.cfg, self.examples
        source = f"task {cfg.task}" if cfg.task else cfg.data
        lines = [
            f"grpo ({cfg.loss_type}, beta {cfg.beta:g}): {source}, {n_train} training problems, {n_held} held out; "
            f"{cfg.prompts_per_step} prompts x {cfg.group_size} samples of up to {cfg.max_completion_tokens} tokens "
            f"a step: {cfg.max_steps} steps, lr {cfg.lr:g}, reward {cfg.reward or 'the task checker'}"
        ]
        if cfg.max_steps < MIN_STEPS:
            lines.append(f"warning: {cfg.max_steps} optimizer steps are too few to move a policy (under {MIN_STEPS})")
        return "\n".join(lines)

    def _build(self) -> None:
        super()._build()
        cfg = self.cfg
        n = cfg.prompts_per_step * cfg.group_size
        self.engine = Engine(self.raw, stop_token_ids=self.tokenizer.stop_token_ids, max_num_seqs=max(n, 16),
                             kv_cache_gb=0.5, max_num_batched_tokens=1024)  # fmt: skip
        self._frozen = None
        if cfg.beta and not cfg.lora:  # full fine-tuning: the reference is a frozen copy
            self._frozen = copy.deepcopy(self.raw).eval().requires_grad_(False)

    def forward_module(self):
        return self.raw

    # ---- rollouts ----------------------------------------------------------------------------------------

    def sample(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[list[list[TokenEvent]]]:
        """Per prompt, per sample, the completion's token events (its end-of-turn token included: stopping is
        learned) from the weights as they are now: under LoRA the adapter being trained, named on every request
        (the engine runs a request without one on the base alone)."""
        engine = self.engine
        engine.pool.forget_prefixes()  # cached prompt K/V came from the weights before the last update
        adapters = [ADAPTER if self.cfg.lora else None] * len(prompts)
        was = self.raw.training
        self.raw.eval()
        try:
            got = engine.run([p.ids for p in prompts], params, adapters)
        finally:
            self.raw.train(was)
        return [[[e for e in events if e.token_id >= 0] for events in per] for per in got]

    def _sample(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[list[list[int]]]:
        return [[[e.token_id for e in events] for events in per] for per in self.sample(prompts, params)]

    def score(self, prompt: Prompt, text: str) -> float:
        value = score(self.reward_fn, prompt, text)
        if value is None:
            self.failures += 1
        return value or 0.0

    def rollouts(self, step: int) -> list[Group]:
        cfg = self.cfg
        n = len(self.prompts)
        picked = []
        for m in range(cfg.prompts_per_step):
            epoch, i = divmod(step * cfg.prompts_per_step + m, n)
            picked.append(self.prompts[int(np.random.default_rng([cfg.seed, epoch]).permutation(n)[i])])
        params = [SamplingParams(n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                                 max_tokens=cfg.max_completion_tokens, seed=(cfg.seed * 1_000_003 + step) * 64 + m)
                  for m in range(len(picked))]  # fmt: skip
        start = time.perf_counter()
        samples = self._sample(picked, params)
        sampled = time.perf_counter() - start
        groups = []
        for prompt, completions in zip(picked, samples, strict=True):
            texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
            groups.append(Group(prompt, completions, [self.score(prompt, t) for t in texts]))
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)
        for g, a in zip(groups, advantages(rewards, cfg.scale_rewards).tolist(), strict=True):
            g.advantages = a
        tokens = sum(len(c) for g in groups for c in g.completions)
        self.record = {"step": step + 1, "event": "rollout", "reward": float(rewards.mean()),
                       "solved": float((rewards >= 1).double().mean()), "completion_tokens": tokens / rewards.numel(),
                       "rollout_s": sampled, "reward_s": time.perf_counter() - start - sampled,
                       "rollout_tokens_per_s": tokens / max(sampled, 1e-9), "reward_failures": self.failures,
                       "groups_without_signal": int((rewards.std(1) == 0).sum())}  # fmt: skip
        return groups

    def micro_batches(self, first: int) -> list[dict[str, Tensor]]:
        """The step's groups. Without a KL term, a group whose samples all scored alike (advantages all 0) adds
        exactly nothing to the gradient: it is left out of the forward and backward, but its tokens still count in
        the loss's normalizer, so the step's gradient is the one over every group (tests check both ways agree)."""
        cfg, groups = self.cfg, self.rollouts(first // self.global_windows)
        tokens = sum(len(c) for g in groups for c in g.completions)
        sequences = sum(len(g.completions) for g in groups)
        self.normalizer = {"dapo": tokens, "grpo": sequences, "dr_grpo": sequences * cfg.max_completion_tokens}
        self.normalizer["tokens"] = tokens
        if not cfg.beta and cfg.skip_uniform_groups:  # one is kept if none has a signal: zero gradients still
            groups = [g for g in groups if any(a != 0 for a in g.advantages)] or groups[:1]  # move Adam's moments
        return [self.batch(g) for g in groups]

    def batch(self, group: Group) -> dict[str, Tensor]:
        pad = self.tokenizer.eos_token_id or 0
        rows = group_rows(group.prompt.ids, group.completions, group.advantages, pad)
        return {k: v.to(self.device) for k, v in rows.items()}

    def micro_loss(self, item: dict[str, Tensor], items: list[dict[str, Tensor]]) -> Tensor:
        cfg = self.cfg
        logps = completion_logps(self.raw, item)
        ref = self.reference_logps(item) if cfg.beta else None
        loss, kl = grpo_loss(logps, logps.detach(), item["advantages"], item["mask"], cfg.epsilon, cfg.beta, ref,
                             cfg.loss_type, max(1, self.normalizer[cfg.loss_type]))  # fmt: skip
        if ref is not None:
            self.record["kl"] = self.record.get("kl", 0.0) + float(kl) / max(1, self.normalizer["tokens"])
        return loss

    @torch.no_grad()
    def reference_logps(self, item: dict[str, Tensor]) -> Tensor:
        """The starting weights' log-probabilities: the adapters switched off (LoRA), or the frozen copy."""
        if self._frozen is not None:
            return completion_logps(self._frozen, item)
        with lora.adapters_off(self.raw):
            return completion_logps(self.raw, item)

    def _optimizer_step(self):
        start = time.perf_counter()
        out = super()._optimizer_step()
        rec = self.record
        rec["update_s"] = time.perf_counter() - start - rec["rollout_s"] - rec["reward_s"]
        rec["rollout_share"] = rec["rollout_s"] / (time.perf_counter() - start)
        self._log(rec)
        return out

    # ---- evaluation ----------------------------------------------------------------------------------------

    def accuracy(self, prompts: list[Prompt]) -> dict[str, Any]:
        """Greedy answers to the held-out problems: the share right (or the mean reward of a user's function),
        their mean length, and the first one's text."""
        greedy = SamplingParams(temperature=0.0, max_tokens=self.cfg.max_completion_tokens)
        out = [c[0] for c in self._sample(prompts, [greedy] * len(prompts))]
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in out]
        scores = [self.score(p, t) for p, t in zip(prompts, texts, strict=True)]
        return {"accuracy": float(np.mean(scores)), "completion_tokens": float(np.mean([len(c) for c in out])),
                "sample": texts[0]}  # fmt: skip

    def evaluate(self) -> dict[str, Any]:
        """Held-out accuracy; val_loss is its complement, so the loop's best checkpoint is the most accurate."""
        out: dict[str, Any] = {"step": self.step}
        if self.heldout:
            held = self.accuracy(self.heldout)
            out.update(val_accuracy=held["accuracy"], val_loss=1 - held["accuracy"],
                       val_completion_tokens=held["completion_tokens"], sample=held["sample"])  # fmt: skip
        return out

    def sample_text(self) -> str:
        return ""


@dataclass
class GRPOResult:
    steps: int
    elapsed_s: float
    examples: tuple[int, int]
    before: dict[str, Any] | None  # held-out accuracy of the starting model
    after: dict[str, Any] | None
    rollout_share: float  # of the steps' wall time, sampling (the rest: rewards, forward, backward, optimizer)
    best_checkpoint: Path | None
    card: str | None


def grpo(cfg: GRPOConfig, resume: bool = False) -> GRPOResult:
    """Reinforce (or continue); the report card compares held-out accuracy before and after."""
    try:
        tuner = GRPOTrainer(cfg, resume)
        before = tuner.evaluate() if not resume and tuner.heldout else None
        if before is not None:
            tuner.out.mkdir(parents=True, exist_ok=True)
            tuner._log({**before, "event": "eval"})
        result = tuner.train()
        after = tuner.evaluate() if tuner.heldout else None
        rows = read_metrics(tuner.out / "metrics.jsonl")
        rec = [r for r in rows if r.get("event") == "rollout"]
        share = float(np.mean([r["rollout_share"] for r in rec])) if rec else 0.0
        out = GRPOResult(result.steps, result.elapsed_s, tuner.examples, before, after, share,
                         result.best_checkpoint, None)  # fmt: skip
        plot_rewards(rows, tuner.out / "rewards.png")
        out.card = report_card(tuner, out, rec)
        (tuner.out / "report.md").write_text(out.card + "\n")
        return out
    finally:
        shutdown()


def plot_rewards(rows: list[dict[str, Any]], path: Path) -> None:
    """The training reward and solved share per step, and the held-out accuracy at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = [r for r in rows if r.get("event") == "rollout"]
    evals = [r for r in rows if r.get("event") == "eval" and "val_accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rec], [r["reward"] for r in rec], lw=0.8, alpha=0.7, label="training reward (mean)")
    ax.plot([r["step"] for r in evals], [r["val_accuracy"] for r in evals], "s-", label="held-out accuracy (greedy)")
    ax.set(xlabel="step", ylabel="reward / accuracy", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_card(tuner: GRPOTrainer, r: GRPOResult, rec: list[dict[str, Any]]) -> str:
    cfg = tuner.cfg
    info = lora.describe(tuner.raw)
    mode = f"LoRA r={cfg.lora_r} on {cfg.lora_targets}" if cfg.lora else "full"
    lines = [
        f"# Reinforcement learning (GRPO, {cfg.loss_type} loss, beta {cfg.beta:g}) of {cfg.base_model}",
        "",
        f"- {mode}; trainable {info['trainable']:,} of {info['total']:,} parameters",
        f"- {cfg.task or cfg.data}: {r.examples[0]} training problems, {r.examples[1]} held out; {r.steps} steps of "
        f"{cfg.prompts_per_step} x {cfg.group_size} samples, lr {cfg.lr:g}, {r.elapsed_s:.0f} s, "
        f"{r.rollout_share:.0%} of it sampling",
    ]
    if rec:
        first, last = rec[: max(1, len(rec) // 5)], rec[-max(1, len(rec) // 5) :]
        mean = lambda rows, k: float(np.mean([x[k] for x in rows]))  # noqa: E731
        lines.append(f"- training reward {mean(first, 'reward'):.2f} (first fifth of the steps) -> "
                     f"{mean(last, 'reward'):.2f} (last fifth); completion {mean(first, 'completion_tokens'):.0f} -> "
                     f"{mean(last, 'completion_tokens'):.0f} tokens")  # fmt: skip
        if rec[-1]["reward_failures"]:
            lines.append(f"- {rec[-1]['reward_failures']} samples scored 0 because the reward function failed on them")
    if r.before and r.after:
        lines.append(f"- held-out greedy accuracy: {r.before['val_accuracy']:.1%} -> {r.after['val_accuracy']:.1%}")
    if r.best_checkpoint is not None:
        lines.append(f"- saved: {r.best_checkpoint}; `trainfer reason-eval {tuner.out} --task ...` measures it")
    return "\n".join(lines)
