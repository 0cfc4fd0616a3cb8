"""The web page's tests: real `trainfer serve` / `trainfer ui` processes on 127.0.0.1 and Debian's chromium
driven by Playwright (its own browser download cannot work here; `make setup` installs /usr/bin/chromium)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import make_tiny_model_dir
from tests.serve.conftest import CHAT_TEMPLATE, ServerProcess
from tests.train.conftest import random_corpus, tiny_settings

ARTIFACTS = Path(os.environ.get("TRAINFER_ARTIFACTS", Path(__file__).parents[2] / "build" / "test-artifacts")) / "web"
# Without the background-networking flags Chromium calls Google's hosts at start (refused here, and noise).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
]


def chromium_path() -> str:
    return os.environ.get("TRAINFER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")  # not session: sync Playwright keeps an event loop running in this thread,
def browser():  # which would break later tests that call asyncio.run
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    if not Path(path).exists():
        pytest.fail(f"no chromium at {path}: `make setup` installs Debian's chromium package")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.errors = errors  # type: ignore[attr-defined]
    yield pg
    context.close()
    assert not errors, errors  # an uncaught exception in the page fails the test that caused it


def make_bigram_model_dir(path: Path, chain: str) -> Path:
    """A tiny Llama whose greedy answer cycles through `chain` (characters distinct), whatever the prompt ends
    with ('>' of the chat template's `<assistant>`): every block adds nothing (o_proj and down_proj are zero),
    so the logits depend on the last token only, and the head maps each character to the next."""
    from safetensors.torch import load_file, save_file

    from trainfer.io.tokenizer import Tokenizer

    make_tiny_model_dir(path, CHAT_TEMPLATE, context=512)
    tok = Tokenizer.from_dir(path)
    ids = [tok.encode(c)[0] for c in chain]
    assert len(set(ids)) == len(ids) and len(tok.encode(chain)) == len(chain)
    file = next(path.glob("*.safetensors"))
    state = load_file(file)
    for name, t in state.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            t.zero_()
    emb, head = state["model.embed_tokens.weight"], state["lm_head.weight"]
    head.zero_()
    for a, b in zip(ids, ids[1:] + ids[:1], strict=True):
        v = emb[a] / emb[a].norm()
        head[b] += 20 * v / v.abs().max()  # the successor's logit dominates: others see a random projection
    save_file({k: v.contiguous() for k, v in state.items()}, str(file), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def chat_server(tmp_path_factory, run_dirs):
    """A tiny model with a 2k context (the page asks up to 256 tokens), serving the first training run too."""
    model = make_tiny_model_dir(tmp_path_factory.mktemp("webchat"), CHAT_TEMPLATE, context=2048)
    server = ServerProcess(str(model), "--run", str(run_dirs[0]), "--response-cache-size", "64")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def run_dirs(tmp_path_factory) -> list[Path]:
    """Two short training runs with evaluations, samples and the memorization probe in metrics.jsonl."""
    from trainfer.train.config import load_config
    from trainfer.train.trainer import train

    root = tmp_path_factory.mktemp("webruns")
    data = random_corpus(root, docs=5, words=240, val_fraction=0.2)
    runs = []
    for name, lr in (("lr-3e-3", 3e-3), ("lr-1e-3", 1e-3)):
        settings = tiny_settings(max_steps=40, eval_every=10, sample_tokens=12, probe_passages=4, lr=lr)
        train(load_config(None, settings, data=str(data), out_dir=str(root / name)))
        runs.append(root / name)
    return runs


@pytest.fixture(scope="session")
def short_context_dir(tmp_path_factory) -> Path:
    """A tiny model with a 256-token context: a long conversation overflows it."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("webshort"), CHAT_TEMPLATE, context=256)
