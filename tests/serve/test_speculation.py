"""`serve --draft ngram`: the server speculates, answers as without, and reports its guesses in /metrics."""

from __future__ import annotations

import subprocess
import sys

import httpx

from tests.serve.conftest import ServerProcess


def test_served_guesses_leave_the_answer_alone_and_show_in_metrics(tiny_chat_dir):
    body = {"model": "m", "prompt": "abcabcabcabcabc", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    answers = []
    for flags in ((), ("--draft", "ngram", "--num-draft-tokens", "4")):
        server = ServerProcess(str(tiny_chat_dir), *flags, "--served-model-name", "m")
        try:
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            answers.append(r.json()["choices"][0]["text"])
            acceptance = server.metric("trainfer_spec_decode_draft_acceptance_rate")
            per_forward = server.metric("trainfer_spec_decode_tokens_per_forward")
        finally:
            server.stop()
    assert answers[0] == answers[1]
    assert 0 < acceptance <= 1 and per_forward > 1  # the last server guessed, and some guesses held


def test_a_bad_draft_is_a_clean_cli_error(tiny_chat_dir):
    done = subprocess.run([sys.executable, "-m", "trainfer.cli", "serve", str(tiny_chat_dir), "--draft", "eagle"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "invalid choice" in done.stderr and "Traceback" not in done.stderr
