"""The web page in a real browser (Debian's chromium under Playwright) against real trainfer servers.

Screenshots of each view land in build/test-artifacts/web/ (or $TRAINFER_ARTIFACTS/web/).
"""

from __future__ import annotations

import json
import re
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

from tests.conftest import make_tiny_model_dir
from tests.serve.conftest import CHAT_TEMPLATE, ServerProcess
from tests.web.conftest import ARTIFACTS, make_bigram_model_dir
from trainfer.train.metrics import read_metrics


def open_page(page, url: str, view: str = "chat"):
    page.goto(f"{url}/#{view}")
    page.wait_for_selector("body[data-ready='1']")
    return page


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def last_answer(page):
    return page.locator(".msg.assistant").last


def test_first_load_is_light_fast_and_local(page, chat_server):
    """Under 200 KB transferred, interactive within a second on loopback, no request leaves 127.0.0.1."""
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.url))
    open_page(page, chat_server.url)
    timing = page.evaluate(
        """() => {
            const nav = performance.getEntriesByType("navigation")[0];
            const res = performance.getEntriesByType("resource");
            return {interactive: nav.domInteractive, loaded: nav.loadEventEnd,
                    bytes: nav.transferSize + res.reduce((a, r) => a + r.transferSize, 0),
                    body: nav.decodedBodySize + res.reduce((a, r) => a + r.decodedBodySize, 0)};
        }"""
    )
    assert timing["bytes"] < 200_000 and timing["body"] < 200_000, timing
    assert 0 < timing["loaded"] < 1000, timing  # ms from navigation start
    assert page.locator("#send").is_enabled()
    send(page, "hi")
    page.wait_for_selector(".msg.assistant[data-state='done']", timeout=30_000)
    hosts = {urlparse(u).netloc for u in seen if not u.startswith("data:")}
    assert hosts == {urlparse(chat_server.url).netloc}, seen


def test_chat_streams_token_by_token_and_keeps_the_conversation(page, chat_server):
    open_page(page, chat_server.url)
    page.fill("#max_tokens", "200")
    page.fill("#seed", "7")
    page.fill("#temperature", "1")
    # Every change of the answer's text while it streams, recorded in the page.
    page.evaluate(
        """() => { window.sizes = [];
           new MutationObserver(() => {
             const a = [...document.querySelectorAll('.msg.assistant .body')].pop();
             if (a) window.sizes.push(a.textContent.length);
           }).observe(document.querySelector('#messages'), {childList: true, subtree: true, characterData: true}); }"""
    )
    with page.expect_request("**/v1/chat/completions") as first:
        send(page, "Tell me a story.")
    page.wait_for_selector(".msg.assistant[data-state='done']", timeout=60_000)
    sizes = page.evaluate("window.sizes")
    growing = sorted({s for s in sizes if s > 0})
    assert len(growing) >= 3, sizes  # painted in several steps, not once at the end
    answer = last_answer(page)
    stats = answer.locator(".stats").inner_text()
    assert "TTFT" in stats and "200 tokens" in stats and "tok/s" in stats and "prefix cache" in stats
    assert float(answer.get_attribute("data-ttft-ms")) > 0
    # The text the page kept is the server's answer to the same request (seeded): nothing lost or doubled.
    messages = page.evaluate("window.trainfer.state.messages")
    assert [m["role"] for m in messages] == ["user", "assistant"]
    body = {"messages": messages[:1], "max_tokens": 200, "seed": 7, "temperature": 1, "top_p": 0.95}
    ref = httpx.post(chat_server.url + "/v1/chat/completions", json=body, headers={"cache-control": "no-cache"})
    assert messages[1]["content"] == ref.json()["choices"][0]["message"]["content"]
    # A second turn sends the whole conversation; the same seeded question again is a response-cache hit.
    with page.expect_request("**/v1/chat/completions") as req:
        send(page, "And then?")
    assert [m["content"] for m in req.value.post_data_json["messages"]][:2] == [m["content"] for m in messages]
    # one conversation, one affinity key (a balancer keeps it on the replica holding its KV); a new chat, a new key
    conversation = first.value.headers["x-trainfer-affinity"]
    assert re.fullmatch("[0-9a-f]{16}", conversation) and req.value.headers["x-trainfer-affinity"] == conversation
    page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-state='done']", timeout=60_000)
    page.click("#new-chat")
    with page.expect_request("**/v1/chat/completions") as req:
        send(page, "Tell me a story.")
    renewed = req.value.headers["x-trainfer-affinity"]
    assert re.fullmatch("[0-9a-f]{16}", renewed) and renewed != conversation
    page.wait_for_selector(".msg.assistant[data-state='done']", timeout=60_000)
    assert "response cache hit" in last_answer(page).locator(".stats").inner_text()
    page.screenshot(path=str(ARTIFACTS / "chat.png"))


def test_settings_are_sent_with_the_request(page, chat_server):
    open_page(page, chat_server.url)
    page.fill("#system", "Answer in one word.")
    page.fill("#temperature", "0.3")
    page.fill("#top_p", "0.8")
    page.fill("#max_tokens", "7")
    page.fill("#seed", "42")
    assert page.locator("#model option").first.get_attribute("value")  # from /v1/models
    with page.expect_request("**/v1/chat/completions") as req:
        send(page, "Hello")
    body = req.value.post_data_json
    assert body["messages"] == [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Hello"},
    ]
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (0.3, 0.8, 7, 42)
    assert body["stream"] is True and "test_time" not in body
    assert body["model"] == page.locator("#model").input_value()  # the picked model or adapter
    page.wait_for_selector(".msg.assistant[data-state='done']", timeout=30_000)
    assert "7 tokens" in last_answer(page).locator(".stats").inner_text()
    # The test-time strategy picker: the request carries the strategy; the server answers with its compute.
    page.select_option("#strategy", "self_consistency")
    page.fill("#tt_n", "3")
    with page.expect_request("**/v1/chat/completions") as req:
        send(page, "What is 2 + 2?")
    assert req.value.post_data_json["test_time"] == {"strategy": "self_consistency", "n": 3}
    page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-state='done']", timeout=60_000)
    assert "3 samples" in last_answer(page).locator(".stats").inner_text()


def test_stop_aborts_the_generation_on_the_server(page, chat_server):
    open_page(page, chat_server.url)
    page.fill("#max_tokens", "1800")
    before = chat_server.metric("trainfer_generation_tokens_total")
    send(page, "Go on forever.")
    page.wait_for_function(
        "() => Number(document.querySelector('.msg.assistant')?.dataset.chunks || 0) > 5", timeout=30_000
    )
    # live, before the answer is done: the stats are painted on the next animation frame, which may come after
    # a few more chunks have landed, so wait for it while the answer is still streaming
    page.wait_for_function(
        "() => { const m = document.querySelector('.msg.assistant');"
        " return m?.dataset.state === 'streaming' && m.querySelector('.stats').textContent.includes('TTFT'); }",
        timeout=10_000,
    )
    page.keyboard.press("Escape")  # Esc stops, as the Stop button does
    page.wait_for_selector(".msg.assistant[data-state='stopped']", timeout=10_000)
    deadline = time.time() + 10
    while chat_server.metric("trainfer_num_requests_running") and time.time() < deadline:
        time.sleep(0.1)
    assert chat_server.metric("trainfer_num_requests_running") == 0
    generated = chat_server.metric("trainfer_generation_tokens_total") - before
    assert 0 < generated < 1800  # freed mid-way, not run to max_tokens
    assert "stopped" in last_answer(page).locator(".stats").inner_text()
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()


def test_vitals_update_after_traffic(page, chat_server):
    open_page(page, chat_server.url, "vitals")
    page.wait_for_selector("[data-chart='ttft'] svg")
    points = int(page.locator("[data-chart='throughput'] polyline").get_attribute("data-count"))
    for _ in range(3):
        body = {"messages": [{"role": "user", "content": "vitals"}], "max_tokens": 300, "temperature": 1}
        assert httpx.post(chat_server.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    page.wait_for_function(
        "n => Number(document.querySelector(\"[data-chart='throughput'] polyline\").dataset.count) >= n + 2",
        arg=points,
        timeout=10_000,
    )
    page.wait_for_function(
        "() => document.querySelector(\"[data-vital='finished'] .v\").textContent !== '0'", timeout=5_000
    )
    assert page.locator("[data-vital='ttft'] .v").inner_text().endswith("ms")
    assert page.locator("[data-chart='ttft'] polyline[data-series='p50']").count() == 1
    rates = json.loads(page.evaluate("JSON.stringify(window.trainfer.state.vitals.map(p => p.tokens_per_s))"))
    assert max(rates) > 0
    page.screenshot(path=str(ARTIFACTS / "vitals.png"), full_page=True)


def test_a_run_dir_served_with_the_model(page, chat_server, run_dirs):
    open_page(page, chat_server.url, "runs")
    rows = read_metrics(run_dirs[0] / "metrics.jsonl")
    page.wait_for_selector("[data-chart='loss'] polyline[data-series='train (batch)']")
    loss = page.locator("[data-chart='loss'] polyline[data-series='train (batch)']")
    assert int(loss.get_attribute("data-count")) == sum("loss" in r for r in rows)
    assert len(loss.get_attribute("points").split()) == sum("loss" in r for r in rows)


def test_runs_overlaid_live_with_probe_and_samples(page, run_dirs, tmp_path):
    """`trainfer ui RUN...`: several runs overlaid, the memorization probe and samples per evaluation, and a
    line appended to metrics.jsonl while the page is open shows up (a live run)."""
    import shutil

    live = tmp_path / "live"
    shutil.copytree(run_dirs[1], live)
    ui = ServerProcess.ui(str(run_dirs[0]), str(live))
    try:
        open_page(page, ui.url, "chat")  # no model here: the page falls back to the runs view
        assert page.locator("#tab-chat").is_hidden() and not page.locator("#view-runs").is_hidden()
        page.wait_for_selector("[data-chart='loss'] polyline[data-series='lr-3e-3 held-out']")
        for run in (run_dirs[0], live):
            rows = read_metrics(run / "metrics.jsonl")
            evals = [r for r in rows if r.get("event") == "eval"]
            name = run.name
            held_out = page.locator(f"[data-chart='loss'] polyline[data-series='{name} held-out']")
            assert int(held_out.get_attribute("data-count")) == len(evals)
            bpb = page.locator(f"[data-chart='bpb'] polyline[data-series='{name} bits/byte']")
            assert int(bpb.get_attribute("data-count")) == len(evals)
            table = page.locator(f"table[data-run='{name}']")
            assert table.locator("tbody tr").count() == len(evals)
            assert "exact held-out" in table.locator("thead").inner_text()  # the probe's columns
            assert table.locator("tbody tr").first.locator("pre").inner_text() == evals[-1]["sample"]
        page.screenshot(path=str(ARTIFACTS / "runs.png"), full_page=True)
        rows = read_metrics(live / "metrics.jsonl")
        n = sum("loss" in r for r in rows)
        step = rows[-1]["step"] + 1
        with open(live / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "loss": 1.0, "lr": 1e-4, "tokens_per_s": 10.0}) + "\n")
            f.write('{"step": 99, "loss": NaN}\n{"torn li')  # a diverged step and a half-written line
        page.wait_for_function(
            "n => Number(document.querySelector(\"polyline[data-series='live train (batch)']\").dataset.count) === n",
            arg=n + 1,
            timeout=10_000,
        )
        # Unticking a run removes it from the charts.
        page.uncheck("#run-list input[data-run='1']")
        page.wait_for_function("() => !document.querySelector(\"polyline[data-series*='live']\")", timeout=5_000)
    finally:
        ui.stop()


def test_model_output_is_text_never_html(page, tmp_path):
    """A real model whose answer is `<script><script>...`, and the renderer fed hostile Markdown."""
    model = make_bigram_model_dir(tmp_path / "bigram", "<script>")
    server = ServerProcess(str(model))
    try:
        open_page(page, server.url)
        page.fill("#max_tokens", "24")
        page.fill("#temperature", "0")
        send(page, "say something")
        page.wait_for_selector(".msg.assistant[data-state='done']", timeout=30_000)
        body = last_answer(page).locator(".body")
        assert body.inner_text().startswith("<script><script><script>")
        assert page.locator("#messages script").count() == 0
    finally:
        server.stop()
    hostile = (
        '<img src=x onerror="window.pwned=1"> **bold <b>x</b>** `<i>code</i>` '
        "[click](javascript:window.pwned=2) [ok](https://example.org/a)\n\n"
        "```html\n<script>window.pwned=3</script>\n```\n- item <svg onload=window.pwned=4>\n> quote"
    )
    result = page.evaluate(
        """src => { const box = document.createElement('div');
             box.append(window.trainfer.renderMarkdown(src)); document.body.append(box);
             return {tags: [...box.querySelectorAll('*')].map(e => e.tagName.toLowerCase()),
                     hrefs: [...box.querySelectorAll('a')].map(a => a.getAttribute('href')),
                     text: box.textContent, pwned: window.pwned ?? null}; }""",
        hostile,
    )
    assert set(result["tags"]) <= {"p", "strong", "code", "a", "pre", "ul", "li", "blockquote", "em"}, result
    assert "strong" in result["tags"] and "pre" in result["tags"] and "ul" in result["tags"]
    assert result["hrefs"] == ["https://example.org/a"]
    assert "<img src=x" in result["text"] and "<script>window.pwned=3</script>" in result["text"]
    page.wait_for_timeout(200)
    assert page.evaluate("window.pwned ?? null") is None


def test_errors_are_readable(page, short_context_dir):
    """401 asks for the key (and works once it is given), 429 retries, a too-long conversation says so."""
    server = ServerProcess(str(short_context_dir), "--api-key", "s3cret", "--max-num-seqs", "1", "--max-queue", "0")
    try:
        open_page(page, server.url)
        send(page, "hello")
        page.wait_for_selector(".msg.error[data-status='401']", timeout=10_000)
        assert "API key" in page.locator(".msg.error").inner_text()
        page.fill("#api_key", "s3cret")
        page.dispatch_event("#api_key", "change")
        page.fill("#max_tokens", "8")
        send(page, "hello")
        page.wait_for_selector(".msg.assistant[data-state='done']", timeout=30_000)
        assert page.evaluate("localStorage.getItem('trainfer.key')") == "s3cret"
        # The one slot is taken by a long streamed request: the page is told 429 and retries after it ends.
        busy = threading.Event()

        def occupy() -> None:
            body = {"prompt": "x", "max_tokens": 200, "stream": True, "temperature": 1}
            headers = {"authorization": "Bearer s3cret"}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i == 2:
                        busy.set()
                        time.sleep(1.5)  # hold the slot while the page asks
                        break

        holder = threading.Thread(target=occupy)
        holder.start()
        assert busy.wait(30)
        send(page, "again")
        page.wait_for_selector("text=retrying in", timeout=10_000)
        holder.join()
        page.wait_for_selector(".msg.assistant:not(.error)[data-state='done'] >> nth=1", timeout=30_000)
        # Longer than the 256-token context: a message that says so.
        page.click("#new-chat")
        send(page, "word " * 200)
        page.wait_for_selector(".msg.error[data-status='400']", timeout=10_000)
        assert "too long" in page.locator(".msg.error").last.inner_text()
        page.screenshot(path=str(ARTIFACTS / "errors.png"))
    finally:
        server.stop()


def test_keyboard_narrow_screen_and_themes(browser, chat_server):
    context = browser.new_context(viewport={"width": 390, "height": 800})
    page = context.new_page()
    try:
        open_page(page, chat_server.url)
        assert page.evaluate("document.querySelector('#settings').open") is False  # folded away when narrow
        page.fill("#input", "line one")
        page.press("#input", "Shift+Enter")
        page.keyboard.type("line two")
        assert page.input_value("#input") == "line one\nline two" and page.locator(".msg").count() == 0
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.user")
        assert page.locator(".msg.user").inner_text() == "line one\nline two"
        page.wait_for_selector(".msg.assistant[data-state='done']", timeout=60_000)
        assert page.evaluate("document.scrollingElement.scrollWidth <= window.innerWidth")  # no sideways scroll
        page.screenshot(path=str(ARTIFACTS / "chat-narrow.png"))
        before = page.evaluate("getComputedStyle(document.body).backgroundColor")
        theme = page.evaluate("document.documentElement.dataset.theme")
        page.click("#theme")
        assert page.evaluate("document.documentElement.dataset.theme") != theme
        assert page.evaluate("getComputedStyle(document.body).backgroundColor") != before
        page.reload()  # the choice is remembered
        page.wait_for_selector("body[data-ready='1']")
        assert page.evaluate("document.documentElement.dataset.theme") != theme
        page.screenshot(path=str(ARTIFACTS / f"chat-narrow-{'dark' if theme == 'light' else 'light'}.png"))
    finally:
        context.close()


@pytest.mark.parametrize("path", ["/ui/app.js", "/ui/app.css", "/"])
def test_static_files_are_in_the_package(chat_server, path):
    r = httpx.get(chat_server.url + path)
    assert r.status_code == 200 and r.headers["cache-control"] == "no-cache" and len(r.content) > 1000


def test_a_cascade_says_who_answered(page, chat_server, tmp_path):
    """serve --upstream: each answer names its side and why; the vitals show the share forwarded."""
    model = make_tiny_model_dir(tmp_path / "edge", CHAT_TEMPLATE, context=2048)
    # a random model is never sure of itself: a bar of 0 forwards every answer to the upstream
    edge = ServerProcess(
        str(model), "--upstream", chat_server.url, "--route", "local-first", "--route-min-logprob", "0"
    )
    try:
        open_page(page, edge.url)
        page.fill("#max_tokens", "8")
        send(page, "Who answers?")
        page.wait_for_selector(".msg.assistant[data-state='done']", timeout=60_000)
        assert last_answer(page).get_attribute("data-route") == "upstream"
        assert "answered upstream (low confidence)" in last_answer(page).locator(".stats").inner_text()
        open_page(page, edge.url, "vitals")
        page.wait_for_selector("[data-vital='route']")
        card = page.locator("[data-vital='route']").inner_text()
        assert "100%" in card and "1 of 1, local-first" in card
    finally:
        edge.stop()


def test_speculation_shows_its_kept_guesses(page, tmp_path):
    """serve --draft MODEL (the model as its own draft: every guess kept): the vitals show the share kept."""
    model = make_tiny_model_dir(tmp_path / "spec", CHAT_TEMPLATE, context=2048)
    server = ServerProcess(str(model), "--draft", str(model))
    try:
        open_page(page, server.url)
        page.fill("#max_tokens", "16")
        send(page, "Guess ahead")
        page.wait_for_selector(".msg.assistant[data-state='done']", timeout=60_000)
        open_page(page, server.url, "vitals")
        page.wait_for_selector("[data-vital='speculation']")
        card = page.locator("[data-vital='speculation']").inner_text()
        assert card.startswith("100%") and "model guesses kept" in card and "by position 100%" in card
    finally:
        server.stop()


def test_an_answer_cut_off_mid_stream_is_an_error_not_an_answer(page, tmp_path):
    """The server dies mid-answer (a replica killed behind a balancer, which cannot retry an answer under way):
    the page says the answer was cut off, and does not keep the fragment as the conversation's context."""
    model = make_tiny_model_dir(tmp_path / "long", CHAT_TEMPLATE, context=8192)
    server = ServerProcess(str(model))
    try:
        open_page(page, server.url)
        page.fill("#max_tokens", "6000")
        send(page, "A long answer, please.")
        page.wait_for_function(
            "() => Number(document.querySelector('.msg.assistant')?.dataset.chunks || 0) >= 5", timeout=30_000
        )
        server.proc.kill()
        page.wait_for_selector(".msg.assistant.error", timeout=30_000)
        text = last_answer(page).inner_text()
        assert "the answer was cut off after" in text and "send the question again" in text
        assert page.evaluate("window.trainfer.state.messages") == []  # neither the question nor the fragment
    finally:
        server.stop()
