"""Reading documents: .txt files (one document per file) and .jsonl files (one per line, `text`)."""
from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Iterator, Sequence


class DataError(ValueError):
    """Unusable training data; the message names the source and the file."""


def expand_paths(patterns: Sequence[str | Path], base: Path | None = None) -> list[Path]:
    """Files named by paths, directories (searched recursively) and globs, sorted, without duplicates."""
    files: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if base is not None and not p.is_absolute():
            p = base / p
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".jsonl") and q.is_file())
        elif any(ch in str(p) for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(str(p), recursive=True) if Path(q).is_file())
        elif p.is_file():
            found = [p]
        else:
            raise DataError(f"{p}: no such file or directory")
        files.extend(found)
    seen, out = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            out.append(f)
    return out


def iter_documents(files: Sequence[Path]) -> Iterator[str]:
    """Non-empty documents in file order. A .jsonl line without a string `text` is an error."""
    for path in files:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                    text = record.get("text") if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise DataError(f"{path}:{lineno}: expected an object with a string field 'text'")
                    if text.strip():
                        yield text
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if text.strip():
                yield text
