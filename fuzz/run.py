"""Run one fuzz target under atheris/libFuzzer.

    .venv/bin/python -m fuzz.run TARGET [libFuzzer options] [CORPUS_DIR ...]

TARGET is package, mime, tls_frames, dicom_ingest or qido. Without a corpus
directory the target's corpus is fuzz/corpus/TARGET (made and seeded on the
first run; libFuzzer adds what it finds there). Default options bound each
input's time and the process's memory (override by passing them).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import atheris

TARGETS = ("package", "mime", "tls_frames", "dicom_ingest", "qido")
HERE = Path(__file__).resolve().parent
DEFAULTS = ("-timeout=10", "-rss_limit_mb=1024", "-max_len=262144")
# Code whose branches guide the fuzzer: medd and the parsers it relies on.
INSTRUMENTED = ["medd", "pydicom", "email", "multipart", "twisted.protocols.basic"]


def write_seeds(module, corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for name, data in module.seed_inputs().items():
            (corpus / name).write_bytes(data)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        raise SystemExit(f"usage: python -m fuzz.run {{{','.join(TARGETS)}}} [libFuzzer options] [corpus dirs]")
    name, rest = argv[1], argv[2:]
    with atheris.instrument_imports(include=INSTRUMENTED):
        module = importlib.import_module(f"fuzz.target_{name}")
    options = [a for a in rest if a.startswith("-")]
    corpora = [a for a in rest if not a.startswith("-")]
    if not corpora:
        corpora = [str(HERE / "corpus" / name)]
    for corpus in corpora:
        write_seeds(module, Path(corpus))
    given = {o.split("=", 1)[0] for o in options}
    options += [d for d in DEFAULTS if d.split("=", 1)[0] not in given]
    atheris.Setup([argv[0], *options, *corpora], module.check)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
