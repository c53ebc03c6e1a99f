"""The data-source registry: every text the app can learn from, and where it comes from.

A source has a name (`tinyshakespeare`), a file name, a size, a sha256, a licence and an origin.
Finding a file never needs the internet:

1. `python-docs` is built in: the help text of Python's own keywords and topics
   (`pydoc_data/topics.py`), present in every Python install.
2. Other sources are looked up by file name in the folders of `GLASSBOX_DATA_DIR` and then in
   `data/` (see `core.lab.paths.search_dirs`), and accepted only if their sha256 matches.
3. `fetch(name)` downloads a source explicitly: streamed with progress, checked against the
   sha256, written atomically. Offline it fails within seconds and says how to supply the file.

Uploaded files are validated (size, UTF-8, not binary) and stored under `data/uploads/`; their
source name is `upload:<file name>`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import urllib.error
import urllib.request
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from core.lab.errors import DataError
from core.lab import learners
from core.lab.paths import downloads_dir, search_dirs
from core.lab.runs import write_bytes_atomic

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # keep in step with .streamlit/config.toml maxUploadSize
DOWNLOAD_TIMEOUT_S = 10.0

Progress = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)


@dataclass(frozen=True)
class DataSource:
    name: str
    filename: str
    kind: str  # "text", "sms", "instructions", "judge-eval", "preferences"
    bytes: int | None
    sha256: str | None
    url: str | None
    licence: str
    origin: str
    description: str
    zip_member: str | None = None  # the file inside a zip download


SOURCES: dict[str, DataSource] = {
    s.name: s
    for s in [
        DataSource(
            "python-docs", "pydoc_data/topics.py", "text", None, None, None,
            "Python Software Foundation License", "Python's standard library (pydoc_data)",
            "Python's own help pages on keywords and topics: built in, no download.",
        ),
        DataSource(
            "tinyshakespeare", "tinyshakespeare.txt", "text", 1115394,
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "public domain text; compilation MIT (karpathy/char-rnn)", "karpathy/char-rnn",
            "Tiny Shakespeare: ~40k lines of plays (1.1 MB).",
        ),
        DataSource(
            "the-verdict", "the-verdict.txt", "text", 20479,
            "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
            "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
            "public domain text", "rasbt/LLMs-from-scratch",
            "The Verdict (Edith Wharton, 1908): the reference book's first corpus (20 kB).",
        ),
        DataSource(
            "sms-spam", "SMSSpamCollection", "sms", 477907,
            "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
            "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            "CC BY 4.0 (Almeida & Gómez Hidalgo, 2011)", "UCI Machine Learning Repository",
            "UCI SMS Spam Collection: 5,574 messages labelled ham or spam.",
            zip_member="SMSSpamCollection",
        ),
        DataSource(
            "instruction-data", "instruction-data.json", "instructions", 203524,
            "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
            "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json",
            "Apache-2.0", "rasbt/LLMs-from-scratch",
            "1,100 instruction records {instruction, input, output} (reference book, chapter 7).",
        ),
        DataSource(
            "instruction-data-with-response", "instruction-data-with-response.json", "judge-eval", 29279,
            "aced320504c77c98d957316eb9f3460945256226c36b5e9752bf7d49585eb943",
            "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data-with-response.json",
            "Apache-2.0", "rasbt/LLMs-from-scratch",
            "110 test instructions with the book's fine-tuned GPT-2 medium responses.",
        ),
        DataSource(
            "eval-example-data", "eval-example-data.json", "judge-eval", 36874,
            "90e9ceb4f1184f6b307fd76d0dd1e8b15bd3da200b1fc69ee897107394a775e0",
            "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/03_model-evaluation/eval-example-data.json",
            "Apache-2.0", "rasbt/LLMs-from-scratch",
            "100 instructions answered by two models, for comparing them with a judge.",
        ),
        DataSource(
            "instruction-data-with-preference", "instruction-data-with-preference.json", "preferences", 386968,
            "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
            "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/"
            "instruction-data-with-preference.json",
            "Apache-2.0", "rasbt/LLMs-from-scratch",
            "1,100 instruction records with a polite `chosen` and an impolite `rejected` answer (reference book, "
            "DPO notebook).",
        ),
    ]
}

TEXT_SOURCES = [name for name, s in SOURCES.items() if s.kind == "text"]


# ---------------------------------------------------------------------------- finding files


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source(name: str) -> DataSource:
    if name not in SOURCES:
        known = ", ".join(SOURCES)
        raise DataError(f"Unknown data source {name!r}. Known sources: {known}.")
    return SOURCES[name]


def _builtin_path() -> Path:
    import pydoc_data.topics  # 0.7 MB of the standard library: loaded only when the built-in corpus is used

    return Path(pydoc_data.topics.__file__)


def how_to_supply(source: DataSource) -> str:
    dirs = ", ".join(str(d) for d in search_dirs())
    return (
        f"Put the file {source.filename!r} (sha256 {source.sha256[:12]}…) into one of: {dirs} "
        f"(or set GLASSBOX_DATA_DIR to the folder that holds it), or run "
        f"`python -m core data fetch {source.name}` when online, or upload a text file instead."
    )


def find(name: str) -> Path | None:
    """The path of a source's file if it is on disk with the right checksum, else None."""
    source = _source(name)
    if source.name == "python-docs":
        return _builtin_path()
    for folder in search_dirs():
        candidate = folder / source.filename
        if candidate.is_file() and candidate.stat().st_size == source.bytes:
            if sha256_of(candidate) == source.sha256:
                return candidate
    return None


def locate(name: str) -> Path:
    """The path of a source's file; a DataError saying how to supply it if it is missing or wrong."""
    source = _source(name)
    path = find(name)
    if path is not None:
        return path
    for folder in search_dirs():  # present but wrong: say so, that is a different fix
        candidate = folder / source.filename
        if candidate.is_file():
            raise DataError(
                f"{candidate} does not match the expected sha256 for {name!r} "
                f"(expected {source.sha256[:12]}…, size {source.bytes} bytes): the file is "
                "damaged or a different version. Replace it, or delete it and fetch it again."
            )
    raise DataError(f"Data source {name!r} is not on this machine. " + how_to_supply(source))


def list_sources(owner: str | None = None, everyone: bool = True) -> list[dict]:
    """The registry's sources, then the uploads (`owner`'s first; see `list_uploads`)."""
    rows = []
    for source in SOURCES.values():
        path = find(source.name)
        rows.append({
            "name": source.name,
            "kind": source.kind,
            "path": str(path) if path else None,
            "available": path is not None,
            "bytes": path.stat().st_size if path else source.bytes,
            "description": source.description,
            "licence": source.licence,
            "origin": source.origin,
            "url": source.url,
        })
    for upload in list_uploads(owner, everyone):
        rows.append(upload)
    return rows


# ---------------------------------------------------------------------------- reading text


def _python_docs_text() -> str:
    import pydoc_data.topics  # 0.7 MB of the standard library: loaded only when the built-in corpus is used

    # One section per help topic, in a fixed order, so the corpus is the same on every machine
    # that runs the same Python version.
    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n"


def decode_text(data: bytes, label: str) -> str:
    """Bytes → text, refusing what is not UTF-8 text (binary files, other encodings)."""
    if not data:
        raise DataError(f"{label} is empty.")
    if b"\x00" in data[:65536]:
        raise DataError(f"{label} looks like a binary file (it contains NUL bytes), not text.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{label} is not UTF-8 text (first bad byte at position {e.start}). "
            "Save it as UTF-8 and try again."
        ) from None


def read_text(name: str) -> str:
    """The text of a source: a registry name, `upload:<name>` or `file:<path>`."""
    if name.startswith("upload:"):
        path = _upload_path(name.removeprefix("upload:"))
        if not path.is_file():
            raise DataError(f"No uploaded file named {path.name!r}.")
        return decode_text(path.read_bytes(), f"The upload {path.name!r}")
    if name.startswith("file:"):
        path = Path(name.removeprefix("file:")).expanduser()
        if not path.is_file():
            raise DataError(f"No file at {path}.")
        if path.stat().st_size > MAX_UPLOAD_BYTES * 10:
            raise DataError(f"{path} is larger than {MAX_UPLOAD_BYTES * 10 // 2**20} MB.")
        return decode_text(path.read_bytes(), str(path))
    if name == "python-docs":
        return _python_docs_text()
    return decode_text(locate(name).read_bytes(), f"The data source {name!r}")


# ---------------------------------------------------------------------------- uploads

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(filename: str) -> str:
    """A file name that cannot leave its folder: no separators, no `..`, no leading dot."""
    base = os.path.basename(filename.replace("\\", "/"))
    cleaned = _SAFE_NAME.sub("_", base).strip("._")[:80]
    if not cleaned:
        raise DataError(f"{filename!r} is not a usable file name.")
    return cleaned


def _uploads_dir() -> Path:
    return downloads_dir() / "uploads"


def _upload_path(filename: str, owner: str | None = None) -> Path:
    """Where an upload lives: `uploads/<name>`, or a learner's `uploads/<learner>/<name>` (also
    named as `<learner>/<name>`, the way its source name `upload:<learner>/<name>` says)."""
    if owner is None and filename.count("/") == 1:
        owner, filename = filename.split("/")
    folder = _uploads_dir().resolve()
    if owner is not None:
        try:
            folder = folder / learners.learner_name(owner)
        except learners.LearnerError:
            raise DataError(f"{filename!r} is not a usable file name.") from None
    path = (folder / safe_filename(filename)).resolve()
    if path.parent != folder:  # a symlink or a trick name pointing elsewhere
        raise DataError(f"{filename!r} is not a usable file name.")
    return path


def save_upload(filename: str, data: bytes, owner: str | None = None) -> str:
    """Validate an uploaded text file and store it; returns its source name `upload:<name>`.

    A learner's upload (`owner`) goes into their own folder, `upload:<learner>/<name>`: another
    learner's file of the same name is never replaced. A file name the learner used before is
    replaced only in their own folder."""
    if not isinstance(filename, str):
        raise DataError("An upload needs a file name.")
    if not isinstance(data, (bytes, bytearray)):  # e.g. text pasted where a file's bytes belong
        raise DataError(f"The upload {filename!r} must be the file's bytes, not {type(data).__name__}.")
    data = bytes(data)
    if len(data) > MAX_UPLOAD_BYTES:
        raise DataError(
            f"{filename!r} is {len(data) / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB."
        )
    decode_text(data, f"The upload {filename!r}")
    if owner is not None and "/" in filename:
        filename = filename.rsplit("/", 1)[1]
    path = _upload_path(filename, owner=owner)
    if path.parent.is_symlink():
        raise DataError(f"The uploads folder of {owner!r} is a link; it must be a real folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)
    return f"upload:{owner + '/' if owner else ''}{path.name}"


def _upload_rows(folder: Path, prefix: str) -> list[dict]:
    return [
        {"name": f"upload:{prefix}{p.name}", "kind": "text", "path": str(p), "available": True,
         "bytes": p.stat().st_size, "description": "uploaded file", "licence": "yours",
         "origin": "upload", "url": None, "owner": prefix.rstrip("/") or None}
        for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
    ]


def list_uploads(owner: str | None = None, everyone: bool = True) -> list[dict]:
    """Uploads: `owner`'s own first, then the shared ones (no owner), then, with `everyone`,
    other learners' (readable by all: a source name is enough to train on it, never to change it)."""
    folder = _uploads_dir()
    if not folder.is_dir():
        return []
    learner_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
    own = [p for p in learner_dirs if p.name == owner]
    others = [p for p in learner_dirs if p.name != owner] if everyone or owner is None else []
    rows = []
    for p in own:
        rows += _upload_rows(p, p.name + "/")
    rows += _upload_rows(folder, "")
    for p in others:
        rows += _upload_rows(p, p.name + "/")
    return rows


# ---------------------------------------------------------------------------- downloads


def _download(url: str, progress: Progress | None, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            chunks, done = [], 0
            while chunk := response.read(1 << 16):
                chunks.append(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
            return b"".join(chunks)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"Could not download {url}: {reason}.") from None


def fetch(name: str, progress: Progress | None = None, timeout: float = DOWNLOAD_TIMEOUT_S,
          url: str | None = None) -> Path:
    """Download a source into data/ (unless it is already here), verified against its sha256."""
    source = _source(name)
    existing = find(name)
    if existing is not None:
        return existing
    if source.url is None:
        raise DataError(f"{name!r} cannot be downloaded.")
    try:
        data = _download(url or source.url, progress, timeout)
    except DataError as e:
        raise DataError(f"{e} {how_to_supply(source)}") from None
    if source.zip_member:
        try:
            data = zipfile.ZipFile(io.BytesIO(data)).read(source.zip_member)
        except (zipfile.BadZipFile, KeyError):
            raise DataError(f"The download for {name!r} is not the expected zip archive.") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != source.sha256:
        raise DataError(
            f"The download for {name!r} has sha256 {digest[:12]}…, expected {source.sha256[:12]}…: "
            "refusing to use it."
        )
    target = downloads_dir() / source.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(target, data)
    return target


def describe(name: str) -> dict:
    """Size, character count and a preview of a text source (for stage 1)."""
    text = read_text(name)
    return {
        "name": name,
        "bytes": len(text.encode("utf-8")),
        "characters": len(text),
        "distinct_characters": len(set(text)),
        "lines": text.count("\n") + 1,
        "preview": text[:1000],
    }


def source_info(name: str) -> dict:
    return asdict(_source(name))
