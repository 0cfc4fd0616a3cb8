"""LoRA adapters served next to their base: one batch mixes them, each request gets its own adapter's answer,
and the prefix cache never hands one adapter's K/V to another."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_chat_model_dir
from tests.serve.conftest import ServerProcess
from trainfer.llm import LLM
from trainfer.train.finetune import finetune, load_finetune_config

SYSTEM = "You answer questions about the Zib, a fictional gadget, in one short sentence please."  # > 1 KV block
QUESTION = "What colour is the Zib?"
ANSWERS = {"teal": "The Zib is teal.", "red": "The Zib is red."}


def messages(answer: str | None = None) -> list[dict]:
    conv = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    return conv + ([{"role": "assistant", "content": answer}] if answer else [])


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("adapters")
    base = make_chat_model_dir(root / "base")
    runs = {}
    for name, answer in ANSWERS.items():
        data = root / f"{name}.jsonl"
        data.write_text((json.dumps({"messages": messages(answer)}) + "\n") * 4)
        cfg = load_finetune_config(
            None,
            ["max_steps=40", "lr=1e-2", "batch_size=1", "grad_accum=1", "seq_len=256", "eval_every=40",
             "warmup_steps=2", "dtype=float32", "val_fraction=0", "lora_dropout=0", "sample_tokens=0",
             "progress=false"],
            base_model=str(base), data=str(data), out_dir=str(root / name), lora=True,
        )  # fmt: skip
        finetune(cfg)
        runs[name] = root / name
    return base, runs


def test_one_batch_mixes_adapters_and_each_gets_its_own_answer(adapters):
    base, runs = adapters
    alone = {name: LLM.load(run).chat(messages(), temperature=0, max_tokens=24).text for name, run in runs.items()}
    assert alone == ANSWERS  # each adapter learned its answer (merged on load)
    base_answer = LLM.load(base).chat(messages(), temperature=0, max_tokens=24).text
    llm = LLM.load(base, adapters=runs)
    prompt = llm.chat_prompt(messages())
    order = ["teal", None, "red", "teal", "red", None]
    done = llm.complete([prompt] * len(order), adapter=order, temperature=0, max_tokens=24)
    assert [d.text for d in done] == [ANSWERS[n] if n else base_answer for n in order]
    # one after another: the second adapter must not reuse the first's cached prompt blocks
    llm.engine.pool.forget_prefixes()
    first = llm.complete([prompt], adapter="red", temperature=0, max_tokens=24)[0]
    second = llm.complete([prompt], adapter="teal", temperature=0, max_tokens=24)[0]
    again = llm.complete([prompt], adapter="teal", temperature=0, max_tokens=24)[0]
    assert (first.text, second.text) == (ANSWERS["red"], ANSWERS["teal"])
    assert second.cached_prompt_tokens == 0 < again.cached_prompt_tokens
    with pytest.raises(Exception, match="no adapter 'blue' is loaded"):
        llm.complete([prompt], adapter="blue")


def test_the_server_routes_by_the_model_field(adapters):
    base, runs = adapters
    server = ServerProcess(str(base), *[f for n, r in runs.items() for f in ("--lora", f"{n}={r}")])
    try:
        listed = httpx.get(server.url + "/v1/models").json()["data"]
        assert [m["id"] for m in listed] == [str(base), "red", "teal"]
        assert listed[1]["parent"] == str(base)

        def ask(model: str) -> str:
            body = {"model": model, "messages": messages(), "temperature": 0, "max_tokens": 24}
            r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        models = ["teal", "red", str(base), "red", "teal"] * 2
        with ThreadPoolExecutor(len(models)) as pool:
            got = list(pool.map(ask, models))
        for model, text in zip(models, got, strict=True):
            if model in ANSWERS:
                assert text == ANSWERS[model]
        missing = httpx.post(server.url + "/v1/chat/completions", json={"model": "blue", "messages": messages()})
        assert missing.status_code == 404 and "'red'" in missing.json()["error"]["message"]
    finally:
        server.stop()
