"""The `trainfer` command: each subcommand is a thin shell over a library function.

trainfer pull smollm2-135m-instruct
trainfer chat smollm2-135m-instruct --message "Hi!"

A subcommand is a settings dataclass (its flags, see flags.py) and the function that takes it, listed in
COMMANDS; the dataclass's docstring is the subcommand's help.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NamedTuple

import torch

from trainfer.cli import bench, cost, infer, model, train
from trainfer.cli.flags import add_flags, build
from trainfer.errors import TrainferError


class Group(NamedTuple):
    help: str
    commands: dict[str, Any]


COMMANDS: dict[str, Any] = {
    "pull": (model.Pull, model.pull),
    "models": (model.Models, model.models),
    "generate": (infer.Generate, infer.generate),
    "chat": (infer.Chat, infer.chat),
    "reason": (infer.Reason, infer.reason_once),
    "reason-eval": (infer.ReasonEval, infer.reason_eval),
    "quantize": (model.Quantize, model.quantize),
    "convert": (model.Convert, model.convert),
    "export": (model.Export, model.export),
    "prepare": (train.Prepare, train.prepare),
    "train": (train.Train, train.train),
    "quickstart": (train.Quickstart, train.quickstart),
    "finetune": (train.Finetune, train.finetune),
    "dpo": (train.Dpo, train.dpo),
    "grpo": (train.Grpo, train.grpo),
    "merge": (model.Merge, model.merge),
    "prune": (model.Prune, model.prune),
    "distill": (train.Distill, train.distill),
    "eval": (train.Eval, train.evaluate),
    "serve": (infer.Serve, infer.serve),
    "ui": (infer.Ui, infer.ui),
    "dataset": Group(
        "build fine-tuning data",
        {
            "from-logs": (train.FromLogs, train.dataset_from_logs_cmd),
            "prefs": (train.Prefs, train.dataset_prefs),
            "answers": (train.Answers, train.dataset_answers),
        },
    ),
    "cost": Group(
        "what training and serving cost, from measured figures",
        {
            "train": (cost.Train, cost.train),
            "decode": (cost.Decode, cost.decode),
            "serve": (cost.Serve, cost.serve),
            "lifetime": (cost.Lifetime, cost.lifetime),
            "advise": (cost.Advise, cost.advise_cmd),
            "edge-vs-cloud": (cost.EdgeVsCloud, cost.edge_vs_cloud),
            "cascade": (cost.Cascade, cost.cascade),
        },
    ),
    "bench": Group(
        "measure trainfer next to its peers",
        {"decode": (bench.Decode, bench.decode), "serve": (bench.Serve, bench.serve)},
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainfer", description=__doc__.splitlines()[0])
    _add_commands(parser, COMMANDS, "command")
    return parser


def _add_commands(parser: argparse.ArgumentParser, table: dict[str, Any], dest: str) -> None:
    sub = parser.add_subparsers(dest=dest, required=True)
    for name, entry in table.items():
        if isinstance(entry, Group):
            _add_commands(sub.add_parser(name, help=entry.help), entry.commands, "what")
            continue
        settings, run = entry
        p = sub.add_parser(name, help=settings.__doc__.strip().splitlines()[0])
        add_flags(p, settings)
        p.set_defaults(_settings=settings, _run=run)  # underscored: a field may be named `run`


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = build(args._settings, args)
        threads = getattr(settings, "threads", None)
        if threads is not None:
            if threads < 1:
                raise TrainferError(f"--threads must be at least 1, got {threads}")
            torch.set_num_threads(threads)
        args._run(settings)
    except TrainferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
