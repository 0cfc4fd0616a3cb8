"""`serve --draft ngram|MODEL`: the server speculates, answers as without, and reports its guesses in /metrics
and /vitals (the web page's feed)."""

from __future__ import annotations

import subprocess
import sys

import httpx

from tests.serve.conftest import ServerProcess


def test_served_guesses_leave_the_answer_alone_and_show_in_metrics(tiny_chat_dir):
    body = {"model": "m", "prompt": "abcabcabcabcabc", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    answers, seen = [], []
    # the model as its own draft: every guess is kept
    for flags in ((), ("--draft", "ngram", "--num-draft-tokens", "4"), ("--draft", str(tiny_chat_dir))):
        server = ServerProcess(str(tiny_chat_dir), *flags, "--served-model-name", "m")
        try:
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            answers.append(r.json()["choices"][0]["text"])
            acceptance = server.metric("trainfer_spec_decode_draft_acceptance_rate")
            per_forward = server.metric("trainfer_spec_decode_tokens_per_forward")
            seen.append((acceptance, per_forward, httpx.get(server.url + "/vitals", timeout=10).json()["speculation"]))
        finally:
            server.stop()
    assert answers[0] == answers[1] == answers[2]
    assert seen[0] == (0, 0, None)
    for (acceptance, per_forward, vitals), draft in zip(seen[1:], ("ngram", "model"), strict=True):
        assert 0 < acceptance <= 1 and per_forward > 1  # the server guessed, and some guesses held
        assert vitals["draft"] == draft and vitals["acceptance"] == acceptance and vitals["guesses"] > 0
        assert vitals["kept_at_position"][0] > 0
    assert seen[2][0] == 1.0


def test_a_bad_draft_is_a_clean_cli_error(tiny_chat_dir):
    done = subprocess.run([sys.executable, "-m", "trainfer.cli", "serve", str(tiny_chat_dir), "--draft", "eagle"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")  # no such model to draft with
