"""Shared fixtures: tiny random Hugging Face checkpoints (seconds) and the real SmolLM2 model (pulled once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SMOLLM2 = "smollm2-135m-instruct"


def make_hf_model(kind: str = "llama", seed: int = 0, **overrides):
    """A tiny randomly initialised transformers model (the reference implementation)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    common.update(overrides)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(**common)
        model = transformers.Qwen3ForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**common)
        model = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    # Random init leaves norms at 1 and biases at 0; perturb them so the test sees if they are dropped.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def assert_same_gradients(ours: torch.nn.Module, hf: torch.nn.Module) -> None:
    """Every parameter's gradient in our model equals the same parameter's in the transformers model (its names
    under `model.`, the head's at the top)."""
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        g = theirs[f"model.{name}" if f"model.{name}" in theirs else name].grad
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4, msg=name)


def make_tiny_model_dir(path: Path, chat_template: str | None = None, context: int = 128) -> Path:
    """A tiny random Llama with a byte-level tokenizer (no merges): a model directory that loads in a second."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from trainfer.io.tokenizer import Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    make_hf_model("llama", vocab_size=256, max_position_embeddings=context).save_pretrained(path)
    Tokenizer(backend, bos_token_id=None, eos_token_id=None, chat_template=chat_template).save(path)
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from trainfer import registry

    return registry.pull(SMOLLM2, quiet=True)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from trainfer import LLM

    return LLM.load(SMOLLM2, dtype="float32")  # the fp32 reference the tests compare with


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own reading of the same GGUF: the reference for logits and tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=smollm2_path.name)
    tok = AutoTokenizer.from_pretrained(smollm2_path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, dtype=torch.float32, **kw).eval()
    return model, tok


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_chat_model_dir(path: Path, seed: int = 0, tied: bool = False) -> Path:
    """A tiny random Llama whose byte-level tokenizer has ChatML's two special tokens (256, 257) and template:
    one token per character, so a test can build the loss mask by hand. `tied`: the embedding is the head."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from trainfer.io.tokenizer import Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    model = make_hf_model("llama", seed=seed, vocab_size=258, max_position_embeddings=512, eos_token_id=257,
                          tie_word_embeddings=tied)  # fmt: skip
    with torch.no_grad():  # a random head at std 0.02 caps every logit near 1: LoRA (head frozen) could not
        model.lm_head.weight.mul_(50)  # make any answer likely; a trained model's head is this sharp
    model.save_pretrained(path)
    Tokenizer(backend, bos_token_id=None, eos_token_id=257, chat_template=CHATML).save(path)
    return path


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory) -> Path:
    return make_chat_model_dir(tmp_path_factory.mktemp("chat-model"))
