"""Data for the demo: the chat instruction dataset shipped with the package, its
tokenization (loss on the assistant's reply only), and the held-out prose for perplexity
(docstrings of standard-library modules, read from this machine's Python at run time).

Example:
    >>> from qlora_kernels.demo.data import load_jsonl, default_data_paths
    >>> train_path, test_path = default_data_paths()
    >>> len(load_jsonl(train_path)) >= 150
    True
"""
from __future__ import annotations

import ast
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..train.data import encode, read_dataset

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
TRAIN_FILE = "answer_format_train.jsonl"
TEST_FILE = "answer_format_test.jsonl"

# Pure-Python standard-library modules whose docstrings make the held-out prose. A fixed
# list (in this order) so the text is the same on every machine with the same Python.
STDLIB_MODULES = (
    "argparse.py", "textwrap.py", "functools.py", "collections/__init__.py", "pathlib.py",
    "pathlib/__init__.py", "pathlib/_local.py", "subprocess.py", "logging/__init__.py",
    "datetime.py", "_pydatetime.py", "fractions.py", "_pydecimal.py", "heapq.py", "bisect.py",
    "shutil.py", "tempfile.py", "contextlib.py", "dataclasses.py", "enum.py", "typing.py",
    "random.py", "statistics.py", "json/__init__.py", "json/decoder.py", "csv.py",
    "inspect.py", "difflib.py", "string.py", "pprint.py", "zipfile.py", "zipfile/__init__.py",
    "tarfile.py", "threading.py", "queue.py", "socket.py", "ssl.py", "urllib/parse.py",
    "email/message.py", "http/client.py", "unittest/case.py", "doctest.py", "pdb.py",
    "pickle.py", "copy.py", "abc.py", "numbers.py", "locale.py", "calendar.py", "gettext.py",
)


def default_data_paths() -> Tuple[Path, Path]:
    """``(train, test)`` JSONL files shipped as package data.

    Example:
        >>> [p.name for p in default_data_paths()]
        ['answer_format_train.jsonl', 'answer_format_test.jsonl']
    """
    return DATA_DIR / TRAIN_FILE, DATA_DIR / TEST_FILE


def resolve_data_paths(data: Optional[str]) -> Tuple[Path, Path]:
    """``--data``: None for the shipped set; a directory holding ``*train*.jsonl`` and
    ``*test*.jsonl``; or ``TRAIN.jsonl[,TEST.jsonl]`` (without a test file, every 8th
    example of the training file is held out).

    Example:
        >>> resolve_data_paths(None)[0].name
        'answer_format_train.jsonl'
    """
    if not data:
        return default_data_paths()
    parts = [Path(p) for p in data.split(",")]
    if len(parts) > 2 or not all(str(p) for p in data.split(",")):
        raise ValueError(f"--data {data}: expected TRAIN.jsonl[,TEST.jsonl] or a directory, "
                         f"got {len(parts)} comma-separated names")
    if len(parts) == 1 and parts[0].is_dir():
        d = parts[0]
        trains, tests = sorted(d.glob("*train*.jsonl")), sorted(d.glob("*test*.jsonl"))
        if not trains or not tests:
            raise FileNotFoundError(f"--data {d}: expected a *train*.jsonl and a *test*.jsonl file in it")
        return trains[0], tests[0]
    for p in parts:
        if not p.is_file():
            raise FileNotFoundError(f"--data: no such file {p}")
    return (parts[0], parts[1]) if len(parts) > 1 else (parts[0], None)


def load_jsonl(path) -> List[List[Dict[str, str]]]:
    """Read a chat JSONL file (one ``{"messages": [{"role", "content"}, ...]}`` per line;
    blank lines skipped) into its message lists: ``read_dataset(path, require="chat")``,
    so a malformed line raises ValueError naming the file and line.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "d.jsonl")
        >>> _ = open(p, "w").write('{"messages": [{"role": "user", "content": "hi"},'
        ...                        ' {"role": "assistant", "content": "ANSWER: hello"}]}\\n')
        >>> load_jsonl(p)[0][1]["content"]
        'ANSWER: hello'
    """
    return [r["messages"] for r in read_dataset(path, require="chat")[1]]


def load_splits(data: Optional[str]) -> Tuple[list, list]:
    """(train, test) example lists for ``--data`` (see ``resolve_data_paths``).

    Example:
        >>> train, test = load_splits(None)
        >>> len(train) >= 150 and len(test) >= 20
        True
    """
    train_path, test_path = resolve_data_paths(data)
    train = load_jsonl(train_path)
    if test_path is None:
        test = train[7::8]
        train = [ex for i, ex in enumerate(train) if i % 8 != 7]
    else:
        test = load_jsonl(test_path)
    if not test:
        raise ValueError(f"--data {train_path}: {len(train)} examples leave no held-out one "
                         "(every 8th is held out): give at least 8, or a TEST.jsonl")
    return train, test


def encode_chat(tokenizer, messages: Sequence[Dict[str, str]], max_len: int = 256):
    """Token ids and labels of one chat example (``train.data.encode``): labels are -100
    on the prompt (everything up to the assistant's turn), so the loss is on the reply only.

    Example (needs a chat tokenizer):
        ids, labels = encode_chat(tok, [{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "ANSWER: hello"}])
    """
    ids, labels, _ = encode(tokenizer, {"messages": list(messages)}, "chat", max_len)
    return ids, labels


def stdlib_docstrings(stdlib_dir: Optional[str] = None, modules: Sequence[str] = STDLIB_MODULES) -> str:
    """Module, class and function docstrings of pure-Python standard-library modules, in a
    fixed order, joined by blank lines: real English prose present on every machine with
    Python (never committed, read at run time). Modules absent from this Python are
    skipped.

    Example:
        >>> "argument" in stdlib_docstrings()[:20000]
        True
    """
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    parts = []
    for rel in modules:
        path = root / rel
        if not path.is_file():
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:  # skip one-liners: mostly identifiers, not prose
                    parts.append(doc)
    if not parts:
        raise FileNotFoundError(f"no standard-library docstrings found under {root}")
    return "\n\n".join(parts)


def perplexity_tokens(tokenizer, n_tokens: int, stdlib_dir: Optional[str] = None) -> torch.Tensor:
    """The first ``n_tokens`` tokens of ``stdlib_docstrings()`` (1-D long tensor).

    Example (needs a tokenizer):
        ids = perplexity_tokens(tok, 4096)
    """
    text = stdlib_docstrings(stdlib_dir)
    # Tokenize only what is needed (about 4 characters per token; doubled for margin).
    ids = tokenizer(text[: max(n_tokens * 8, 4096)], add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise ValueError(f"only {len(ids)} held-out tokens available, {n_tokens} requested")
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


__all__ = ["load_jsonl", "load_splits", "encode_chat",
           "stdlib_docstrings", "perplexity_tokens", "default_data_paths", "resolve_data_paths",
           "DATA_DIR"]
