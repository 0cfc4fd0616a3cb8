"""lm-evaluation-harness against `trainfer serve`: its `local-completions` model must score a multiple-choice task
exactly as lm-eval's own `hf` backend does on the same weights (SmolLM2 exported to a Hugging Face directory).

local-completions scores a choice by POSTing the context+continuation token ids to /v1/completions with
`echo: true, max_tokens: 1, logprobs: 1` and summing `token_logprobs[ctxlen:-1]` (the `-1` drops the one generated
token), so the server must echo one logprob per prompt token and then exactly one for the generated token, even when
that token is the end-of-sequence token. The task (tests/serve/lm_eval_task) is a local YAML + JSON Lines file;
nothing is read from the Hugging Face hub.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import SMOLLM2
from tests.serve.conftest import ServerProcess

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval[api] is a dev dependency")

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[2]
TASK_DIR = Path(__file__).resolve().parent / "lm_eval_task"
TASK = "trainfer_mc"
N_DOCS = 32
# Its greedy next token is <|im_end|> (p ~ 0.48 under SmolLM2-135M-Instruct): the echoed logprobs must still count it.
EOS_PROMPT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n2+2 = 4."


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No hub access and every Hugging Face / lm-eval cache in a temporary directory."""
    cache = tmp_path_factory.mktemp("hf_cache")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str(cache),
            "HF_DATASETS_CACHE": str(cache / "datasets"),
            "LM_HARNESS_CACHE_PATH": str(cache / "lm_eval"),
            "TOKENIZERS_PARALLELISM": "false",
        }.items():
            mp.setenv(name, value)
        # These modules read the environment once, at import; other tests may have imported them already.
        if "huggingface_hub" in sys.modules:
            import huggingface_hub.constants

            mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        import datasets.config

        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
        # The task's data_files path is relative to the repository root, as for `lm_eval` run from there.
        mp.chdir(ROOT)
        yield cache


@pytest.fixture(scope="module")
def hf_dir(smollm2_path, tmp_path_factory) -> Path:
    from trainfer.io.loader import export_hf

    return export_hf(SMOLLM2, tmp_path_factory.mktemp("smollm2_hf") / "model", "float32")


@pytest.fixture(scope="module")
def task_manager(offline):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=False)


def evaluate(model: str, model_args: dict, task_manager, batch_size: int) -> dict:
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        task_manager=task_manager,
        batch_size=batch_size,
        log_samples=True,
        bootstrap_iters=0,
    )


def per_choice_loglikelihoods(results: dict) -> dict[int, list[float]]:
    """doc_id -> the log-likelihood of each choice, as lm-eval scored it."""
    return {s["doc_id"]: [ll for ll, _ in s["filtered_resps"]] for s in results["samples"][TASK]}


@pytest.fixture(scope="module")
def hf_results(hf_dir, task_manager) -> dict:
    args = {"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu"}
    return evaluate("hf", args, task_manager, batch_size=8)


@pytest.fixture(scope="module")
def server(smollm2_path):
    server = ServerProcess(SMOLLM2, "--max-num-seqs", "8", "--dtype", "float32", "--kv-dtype", "fp32")  # vs HF in fp32
    yield server
    server.stop()


def test_hf_backend_scores_the_local_task_offline(hf_results):
    metrics = hf_results["results"][TASK]
    assert len(hf_results["samples"][TASK]) == N_DOCS
    assert all(len(s["filtered_resps"]) == 4 for s in hf_results["samples"][TASK])
    # Simple questions: well above the 25 % of chance even for a 135M model.
    assert metrics["acc,none"] >= 0.6, metrics


def test_echo_logprobs_follow_the_completions_contract(server, hf_dir, offline):
    """The response shape lm-eval relies on: one logprob per prompt token (the first null), then the generated one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompts = [
        tok(EOS_PROMPT, add_special_tokens=False).input_ids,
        tok("The capital of France is", add_special_tokens=False).input_ids,
    ]
    body = {"model": SMOLLM2, "prompt": prompts, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    for k, (ids, choice) in enumerate(zip(prompts, choices, strict=True)):
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        if k == 0:
            assert ref[-1].argmax().item() == tok.eos_token_id, "EOS_PROMPT no longer ends in a greedy EOS"
        lp = choice["logprobs"]
        n = len(ids) + 1  # the prompt, then exactly max_tokens generated tokens, a stop token included
        lengths = [len(lp[f]) for f in ("tokens", "token_logprobs", "top_logprobs", "text_offset")]
        assert lengths == [n] * 4, f"prompt {k}: {len(ids)} prompt + 1 generated entries expected (a stop token too)"
        assert lp["token_logprobs"][0] is None
        if k == 1:  # plain text (how special tokens are spelled in the echo is left open)
            assert "".join(lp["tokens"][: len(ids)]) == tok.decode(ids)
            assert choice["text"].startswith(tok.decode(ids))
        expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))] + [ref[-1].max().item()]
        assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-3)
        # Greedy: the generated token's logprob is the best of its top_logprobs (lm-eval's is_greedy test).
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())


@pytest.mark.parametrize(
    ("batch_size", "num_concurrent", "tokenizer"),
    [(1, 8, "huggingface"), (4, 2, "server")],
    ids=["single-hf-tokenizer", "batched-server-tokenizer"],
)
def test_local_completions_matches_hf(server, hf_dir, task_manager, hf_results, batch_size, num_concurrent, tokenizer):
    """With the exported tokenizer, or with none: lm-eval's "auto" backend then finds /tokenizer_info and
    tokenizes through the server's /tokenize and /detokenize."""
    tokenizer_args = (
        {"tokenizer_backend": "huggingface", "tokenizer": str(hf_dir)}
        if tokenizer == "huggingface"
        else {"tokenizer_backend": "auto"}
    )
    args = {
        "model": SMOLLM2,
        "base_url": server.url + "/v1/completions",
        **tokenizer_args,
        "num_concurrent": num_concurrent,
        "max_retries": 1,
        "timeout": 120,
    }
    served = evaluate("local-completions", args, task_manager, batch_size=batch_size)
    got, want = per_choice_loglikelihoods(served), per_choice_loglikelihoods(hf_results)
    assert got.keys() == want.keys() and len(got) == N_DOCS
    assert all(math.isfinite(x) for d in got for x in got[d])
    diffs = sorted(
        ((abs(a - b), d, i, a, b) for d in want for i, (a, b) in enumerate(zip(got[d], want[d], strict=True)))
    )
    worst, doc, choice, ours_ll, hf_ll = diffs[-1]
    assert worst < 1e-3, (
        f"{sum(x[0] >= 1e-3 for x in diffs)} of {len(diffs)} choices differ; worst: doc {doc} choice {choice}: "
        f"served {ours_ll:.4f} vs hf {hf_ll:.4f}"
    )
    ours, theirs = served["results"][TASK], hf_results["results"][TASK]
    assert ours["acc,none"] == theirs["acc,none"]
    assert ours["acc_norm,none"] == theirs["acc_norm,none"]
