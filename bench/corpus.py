"""The benchmark corpus: real short English texts from Debian's fortunes, as JSONL {"id", "text"}.

`/work/shared/tools/make-fortunes-corpus` writes it where that folder exists; elsewhere the same
logic runs from here. A corpus larger than fortunes (about 15,000 texts) repeats them with
distinct ids, which is enough to measure memory against corpus size.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

FORTUNES = Path("/usr/share/games/fortunes")
SHARED_TOOL = Path(__file__).resolve().parents[2] / "shared" / "tools" / "make-fortunes-corpus"


def _install_fortunes() -> None:
    if FORTUNES.is_dir():
        return
    if shutil.which("apt-get") is None:
        raise SystemExit("bench: Debian's fortunes package is missing and apt-get is not here; install `fortunes`")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "fortunes"], check=True)


def _fortunes_texts() -> list[str]:
    """Every fortune, whitespace collapsed, in the order make-fortunes-corpus writes them."""
    _install_fortunes()
    texts: list[str] = []
    for name in sorted(os.listdir(FORTUNES)):
        path = FORTUNES / name
        if name.endswith((".dat", ".u8")) or path.is_symlink() or path.is_dir():
            continue
        for doc in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = " ".join(doc.split())
            if text:
                texts.append(text)
    return texts


def _base_texts(cache: Path) -> list[str]:
    """All fortunes, from the shared tool when it is there (the same texts either way)."""
    base = cache / "fortunes-all.jsonl"
    if not base.exists():
        if SHARED_TOOL.exists():
            subprocess.run([str(SHARED_TOOL), str(base)], check=True, stdout=subprocess.DEVNULL)
        else:
            with open(base, "w", encoding="utf-8") as out:
                for n, text in enumerate(_fortunes_texts()):
                    out.write(json.dumps({"id": f"f{n}", "text": text}, ensure_ascii=False) + "\n")
    with open(base, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def make_corpus(cache: Path, docs: int) -> Path:
    """A JSONL corpus of `docs` records in `cache` (made once, reused by later runs)."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"fortunes-{docs}.jsonl"
    if path.exists():
        return path
    texts = _base_texts(cache)
    temp = path.with_suffix(".tmp")
    with open(temp, "w", encoding="utf-8") as out:
        for n in range(docs):
            out.write(json.dumps({"id": f"d{n}", "text": texts[n % len(texts)]}, ensure_ascii=False) + "\n")
    temp.replace(path)
    return path


def read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def make_parquet_corpus(cache: Path, docs: int, row_group_rows: int = 10_000) -> Path:
    """The same corpus as `make_corpus`, as Parquet (columns id, text) in row groups, written as a stream."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = cache / f"fortunes-{docs}.parquet"
    if path.exists():
        return path
    source = make_corpus(cache, docs)
    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    temp = path.with_suffix(".tmp")
    with open(source, encoding="utf-8") as handle, pq.ParquetWriter(temp, schema) as writer:
        batch: list[dict[str, str]] = []
        for line in handle:
            batch.append(json.loads(line))
            if len(batch) == row_group_rows:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    temp.replace(path)
    return path
