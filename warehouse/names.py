"""The one check for every name that reaches a path or a SQL string.

Run ids and site names become single path components (runs/<id>.json, journal/<id>/,
tmp/<id>.rank-<n>/, data/<table>/run_id=<id>/site=<site>/) and are quoted into SQL
text, so they follow a grammar that is a safe component by construction:

    1 to 128 characters from A-Z a-z 0-9 . _ -, the first a letter or digit;
    no '..'; no '.rank-' (a tmp/ entry names its writer with it);
    not ending in a suffix the layout gives its own files (RESERVED_SUFFIXES, any case).

Dataset and role labels are data: stored in a column and passed to SQL as literals or
parameters, never as paths. Any text of 1 to 256 characters is allowed, except control,
format and line-separator characters (they would break the one-line messages and the
SQL a message suggests, and reach terminals and pages). The labels a data file carries
(doc_id, up to 1024 characters; dataset, role, label, message_role) follow the same rule,
and a doc_id names one document only (check_documents).
"""

from __future__ import annotations

import re
import unicodedata
from array import array
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import BadInput

# re.fullmatch, not match with '$': '$' also matches before a final newline.
_GRAMMAR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
# Suffixes of the layout's own files: manifests and the marker (.json), journals (.jsonl),
# manifests set aside (.damaged), temporaries (.tmp, .wal), locks, rank markers, parts, the catalog.
RESERVED_SUFFIXES = (".json", ".jsonl", ".damaged", ".tmp", ".wal", ".lock", ".done", ".parquet", ".duckdb")
RANK_SEPARATOR = ".rank-"
MAX_LABEL = 256
MAX_DOC_ID = 1024
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


def name_problem(name: object) -> str | None:
    """Why `name` is not a valid run id or site name (None when it is)."""
    if not isinstance(name, str) or not _GRAMMAR.fullmatch(name):
        return "use letters, digits, '.', '_' or '-' (at most 128 characters, starting with a letter or digit)"
    if ".." in name:
        return "'..' is not allowed in a name (names become folder names): pick another name"
    if RANK_SEPARATOR in name:
        return f"'{RANK_SEPARATOR}' is reserved for whq's temporary folders: pick another name"
    suffix = next((s for s in RESERVED_SUFFIXES if name.lower().endswith(s)), None)
    if suffix:
        return f"the suffix '{suffix}' is reserved for whq's own files: pick another name"
    return None


def is_valid_name(name: object) -> bool:
    return name_problem(name) is None


def check_name(kind: str, name: object) -> str:
    """`name` if it is a valid run id or site name; BadInput naming the rule otherwise."""
    problem = name_problem(name)
    if problem:
        raise BadInput(f"invalid {kind} {name!r}: {problem}")
    return name


def label_problem(label: object, max_length: int = MAX_LABEL) -> str | None:
    """Why `label` is not a valid label (None when it is): the rule for dataset and role flags and
    for every label a data file carries (doc_id, dataset, role, label, message_role)."""
    if (
        not isinstance(label, str)
        or not 1 <= len(label) <= max_length
        or not label.strip()
        or (
            not _PRINTABLE_ASCII.fullmatch(label)  # the common case, without a look-up per character
            and any(unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") for c in label)
        )
    ):
        return f"use text of 1 to {max_length} characters without control characters"
    return None


def check_label(kind: str, label: object) -> str:
    """`label` if it is a valid dataset or role label; BadInput otherwise."""
    problem = label_problem(label)
    if problem:
        raise BadInput(f"invalid {kind} {label!r}: {problem}")
    return label


# A document's labels: (column, where the reader keeps it, its longest length). Ids may be long (URLs).
DOCUMENT_LABELS = (
    ("doc_id", "doc_id", MAX_DOC_ID),
    ("dataset", "dataset", MAX_LABEL),
    ("role", "role", MAX_LABEL),
    ("label", "label", MAX_LABEL),
    ("message_role", "meta", MAX_LABEL),
)


def document_label_problem(doc) -> str | None:
    """Why one of a document's labels (DOCUMENT_LABELS) is not valid (None when all are): the check
    check_documents makes of every document of a file, and dataset sources of each row they stream."""
    for column, attribute, longest in DOCUMENT_LABELS:
        value = getattr(doc, attribute, None)
        value = value.get(column) if isinstance(value, dict) else value
        problem = None if value is None else label_problem(value, longest)
        if problem:
            return f"invalid {column} {value!r}: {problem}"
    return None


def _id_hash(doc_id: str) -> int:
    return hash(doc_id) & 0xFFFF_FFFF_FFFF_FFFF  # compared within this process only


def check_documents(paths: Iterable, read_file: Callable[[object], Iterable]) -> None:
    """Every document of the data files checked before a run exists: each label it carries is a
    valid label (label_problem, like --dataset/--role), and no doc_id is given twice.

    Labels are data that reach terminals and pages; pages and exports name a document by its
    doc_id, so two documents sharing one would show each other's text. `read_file(path)`
    yields a file's documents (objects with doc_id, dataset, role, label, meta). Ids are
    remembered as 8-byte hashes (80 MB for 10M documents); a repeated hash is confirmed on a
    second pass. BadInput names the file, the document and the fix.
    """
    import numpy as np

    paths = list(paths)
    resolved = [Path(path).resolve() for path in paths]
    for index, path in enumerate(resolved):
        if path in resolved[:index]:
            raise BadInput(f"data file {paths[index]} is given twice: give each --data once")
    hashes = array("Q")
    for path in paths:
        if label_problem(Path(path).stem):  # it names the file's documents when they carry no dataset or id
            raise BadInput(
                f"data file {str(path)!r}: its name labels its documents, so it must be a valid label "
                f"({label_problem(Path(path).stem)}): rename it"
            )
        for number, doc in enumerate(read_file(path), start=1):
            problem = document_label_problem(doc)
            if problem:
                raise BadInput(f"{path}, document {number}: {problem}; fix it in the data file")
            hashes.append(_id_hash(doc.doc_id))
    ordered = np.sort(np.frombuffer(hashes, dtype=np.uint64))
    repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not repeated:
        return
    first: dict[str, str] = {}
    for path in paths:
        for number, doc in enumerate(read_file(path), start=1):
            if _id_hash(doc.doc_id) not in repeated:
                continue
            where = f"{path}, document {number}"
            if doc.doc_id in first:
                fix = (
                    "rename one of the files (a file's name makes the ids of documents that carry none)"
                    if doc.doc_id.startswith(f"{Path(path).stem}:")
                    else "give each document its own id, e.g. prefix each file's ids with its name"
                )
                raise BadInput(
                    f"{where}: doc_id {doc.doc_id!r} is also the id of {first[doc.doc_id]}, and pages and exports "
                    f"name documents by it: {fix}"
                )
            first[doc.doc_id] = where
