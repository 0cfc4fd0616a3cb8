"""One figure, one source: every measured number in README.md and docs/ is copied from BENCHMARKS.md, and every
BENCHMARKS.md section says how, when and on what it was measured, or that it is stale."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# A number (1,000 / 2.27 / 1.10-1.33) and a unit of speed, memory, time or quality.
FIGURE = re.compile(
    r"(?<![\w.])(\d[\d,]*(?:\.\d+)?(?:-\d[\d,]*(?:\.\d+)?)?)\s?(x|%|tok/s|tokens/s|GiB|GB/s|GB|MB|KB|ms|s)(?![\w/])"
)
# Numbers with those units that are not measurements: settings, sizes by construction, worked examples.
NOT_MEASURED = {
    ("README.md", "60 s"): "the --drain-timeout default",
    ("README.md", "17.5 tokens/s"): "an example of the stderr line's format",
    ("README.md", "190 ms"): "an example of the stderr line's format",
    ("docs/web.md", "60 s"): "the window the page's percentiles cover",
    ("docs/compress.md", "128 KB"): "the teacher cache's size per window, by construction (256 x 64 x 8 bytes)",
    ("docs/cost.md", "86,400 x"): "seconds in a day, in a formula",
    ("docs/cost.md", "99.9999%"): "a worked example of the formula",
    ("docs/cost.md", "100-1000x"): "how much larger the models behind the seed's figure are: an order of magnitude",
    ("docs/cost.md", "17.5%"): "a budget share quoted from the seed",
    ("docs/cost.md", "8.5%"): "a budget share quoted from the seed",
    ("docs/cost.md", "1.3 s"): "a worked example over the dated report docs/data/serve-smollm2-int8-2026-12-02.json",
    ("docs/cost.md", "18 s"): "how long the dated example transcript took",
    ("docs/cost.md", "156 tokens/s"): "a line of the dated example transcript",
    ("docs/cost.md", "2x"): "a setting of the worked example (peak over average load)",
    ("docs/cost.md", "11x"): "a projection of the cost model's roofline, said so where it is stated",
    ("README.md", "11x"): "the cost model's projection (docs/cost.md), said so where it is stated",
    ("docs/reason.md", "2 x"): "the FLOPs formula",
    ("docs/web.md", "2 s"): "the page's polling interval",
    ("docs/finetune.md", "2%"): "the fine-tuning target, not a result",
    ("README.md", "20 MB"): "the LoRA adapter's size, by construction (rank 16 on SmolLM2's projections, fp32)",
    ("README.md", "151 MB"): "the int8 directory's size, by construction",
    ("README.md", "39 KB"): "the static files' size (du), checked by test_the_page_is_as_small_as_the_docs_say",
    ("docs/web.md", "39 KB"): "the static files' size (du), checked by test_the_page_is_as_small_as_the_docs_say",
    ("docs/deploy.md", "3 s"): "the --drain-grace that deploy/ sets (two failed checks a second apart, with room)",
    ("docs/deploy.md", "60 s"): "the --drain-timeout default",
    ("docs/deploy.md", "70 s"): "the grace periods deploy/ sets (drain grace + drain timeout, with room)",
    ("docs/cost.md", "45%"): "a budget share quoted from the seed",
    ("docs/cost.md", "4%"): "a budget share quoted from the seed",
    ("docs/cost.md", "70%"): "the projection's assumed share of memory bandwidth, said so where it is stated",
    ("docs/cost.md", "0.5 ms"): "the projection's assumed overhead per step, said so where it is stated",
    ("docs/cost.md", "6 x"): "the FLOPs formula",
    ("docs/engine.md", "1 KB"): "the kernels' prefetch distance, a setting",
    ("docs/engine.md", "1.8x"): "history: why the engine steps on the event loop's thread (docs/LOG.md)",
    ("docs/finetune.md", "73-77%"): "history: the tuning runs on the dev split, said so in the sentence",
}
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md") if p.name != "LOG.md")]


def figures(text: str) -> list[str]:
    return [f"{m.group(1)}{' ' if ' ' in m.group(0) else ''}{m.group(2)}" for m in FIGURE.finditer(text)]


def normalized(text: str) -> str:
    return re.sub(r"\s+", "", text)


def sections() -> list[tuple[str, str]]:
    text = (ROOT / "BENCHMARKS.md").read_text()
    parts = re.split(r"^(#{2,3} .*)$", text, flags=re.M)
    return list(zip(parts[1::2], parts[2::2], strict=True))


def is_stale(body: str) -> bool:
    return re.search(r"^\*\*Stale\*\*", body, flags=re.M) is not None


@pytest.mark.parametrize("doc", DOCS)
def test_every_figure_in_the_docs_is_in_a_current_section_of_benchmarks(doc):
    """Whole figures only (3% is not 73.3%), and not from a section marked stale: a stale figure is history."""
    current, stale = set(), set()
    for heading, body in sections():
        (stale if is_stale(body) else current).update(normalized(f) for f in figures(heading + body))
    stated = [f for f in figures((ROOT / doc).read_text()) if (doc, f) not in NOT_MEASURED]
    missing = [f for f in stated if normalized(f) not in current | stale]
    assert not missing, f"{doc} states figures BENCHMARKS.md does not have (copy them from there): {missing}"
    old = [f for f in stated if normalized(f) not in current]
    assert not old, f"{doc} quotes figures found only in stale sections of BENCHMARKS.md (re-measure): {old}"


def test_the_exemptions_are_still_used():
    for doc, figure in NOT_MEASURED:
        assert figure in figures((ROOT / doc).read_text()), f"{doc} no longer says {figure}: drop the exemption"


def test_the_page_is_as_small_as_the_docs_say():
    size = sum(p.stat().st_size for p in (ROOT / "trainfer" / "web" / "static").iterdir() if p.is_file())
    assert round(size / 1000) == 39, f"trainfer/web/static holds {size} bytes: update README.md and docs/web.md"


@pytest.mark.parametrize("heading,body", sections(), ids=[h for h, _ in sections()])
def test_every_section_names_command_date_commit_and_flags_or_is_marked_stale(heading, body):
    if is_stale(body):
        return
    assert re.search(r"\d{4}-\d{2}-\d{2}", heading + body), "no date"
    assert re.search(r"`[^`]*(benchmarks/|trainfer )[^`]*`", body), "no command"
    assert re.search(r"commit [0-9a-f]{7}", body, flags=re.I), "no commit"
    assert re.search(r"avx", body), "no CPU flags"


def test_the_figure_pattern_finds_what_a_reader_reads_as_figures():
    text = "decode 1.21x (1.16-1.23), 99.3 tok/s, 4.82 GiB, TTFT ~100 ms, 73.3%, 1,000-token, 3 seeds, in 2.5 s"
    assert figures(text) == ["1.21x", "99.3 tok/s", "4.82 GiB", "100 ms", "73.3%", "2.5 s"]
