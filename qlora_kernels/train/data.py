"""Training data for ``qlora-kernels train``: JSONL files in one of three formats, detected
per file, tokenized with labels on the completion only, truncated, optionally packed.

Formats (every line of a file must have the same one; blank lines are skipped):

- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``,
  the last message the assistant's. Rendered with the tokenizer's chat template, or, when
  the tokenizer has none, with ``FALLBACK_TEMPLATE`` (one warning). Every assistant turn is
  a target.
- instruction: ``{"prompt": str, "completion": str}`` (prompt and completion concatenated,
  then the end-of-sequence token), or Alpaca's ``{"instruction", "input" (optional),
  "output"}`` rendered with ``ALPACA_PROMPT`` / ``ALPACA_PROMPT_NO_INPUT``.
- text: ``{"text": str}`` followed by the end-of-sequence token; every token is a target.

Labels are -100 on prompt and template tokens (QLoRA trains on targets only) unless
``train_on_prompt``; the first token's label is always -100 (nothing predicts it), which
also keeps packed examples from predicting across their boundary.

Example:
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "d.jsonl")
    >>> _ = open(p, "w").write('{"text": "hello"}\\n{"text": "world"}\\n')
    >>> fmt, rows = read_dataset(p); fmt, rows[1]["text"]
    ('text', 'world')
"""
from __future__ import annotations

import functools
import json
import random
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

ROLES = ("system", "user", "assistant")
# The fallback chat template (for tokenizers without one): each message as a role marker
# line and its content; an assistant message ends with the end-of-sequence token.
FALLBACK_TEMPLATE = "<|{role}|>\n{content}{end}\n"
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that "
                 "provides further context. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                 "### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response "
                          "that appropriately completes the request.\n\n### Instruction:\n"
                          "{instruction}\n\n### Response:\n")
# format name -> (keys that identify it, keys that must be strings)
FORMATS = {"chat": (("messages",), ()),
           "prompt-completion": (("prompt", "completion"), ("prompt", "completion")),
           "alpaca": (("instruction", "output"), ("instruction", "output")),
           "text": (("text",), ("text",))}


def detect_format(obj, where: str) -> str:
    """The format of one JSONL record (see the module docstring); ValueError naming
    ``where`` otherwise.

    Example:
        >>> detect_format({"prompt": "a", "completion": "b"}, "f, line 1")
        'prompt-completion'
    """
    if isinstance(obj, dict):
        for name, (keys, _) in FORMATS.items():
            if all(k in obj for k in keys):
                return name
    got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{where}: expected an object with \"messages\" (chat), \"prompt\" and "
                     f"\"completion\", \"instruction\" and \"output\" (Alpaca), or \"text\"; "
                     f"got {got}"[:300])


def _check_record(obj: dict, fmt: str, where: str) -> None:
    for key in FORMATS[fmt][1] + (("input",) if fmt == "alpaca" and "input" in obj else ()):
        if not isinstance(obj[key], str):
            raise ValueError(f"{where}: \"{key}\" must be a string, got {type(obj[key]).__name__}")
    if fmt != "chat":
        return
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: expected an object with a non-empty \"messages\" list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: messages[{i}] must be {{\"role\": system|user|assistant, "
                             f"\"content\": str}}, got {m!r}"[:300])
    if msgs[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's reply (the target)")


def read_dataset(path, require: Optional[str] = None) -> Tuple[str, List[dict]]:
    """Read a JSONL data file: ``(format, records)``. Each line is checked (UTF-8, JSON, the
    format's keys and types, the same format as the first line); a bad one raises
    ValueError naming the file and line, an empty file ValueError too. ``require`` names
    the one format accepted.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "d.jsonl")
        >>> _ = open(p, "w").write('{"prompt": "2+2=", "completion": "4"}\\n')
        >>> read_dataset(p)[0]
        'prompt-completion'
    """
    out, fmt = [], None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}, line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}: not UTF-8 text ({exc.reason} at byte "
                                 f"{exc.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            this = require if require else detect_format(obj, where)
            if require and not (isinstance(obj, dict) and all(k in obj for k in FORMATS[require][0])):
                raise ValueError(f"{where}: expected an object with a non-empty \"messages\" list")
            if fmt is not None and this != fmt:
                raise ValueError(f"{where}: a {this} record in a {fmt} file (the format is set "
                                 f"by the first line; use one format per file)")
            fmt = this
            _check_record(obj, fmt, where)
            out.append(obj)
    if not out:
        raise ValueError(f"{path}: no examples (empty data set)")
    return fmt, out


# ----------------------------------------------------------------------------- rendering
def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template (GGUF tokenizers often do not).

    Example:
        >>> has_chat_template(object())
        False
    """
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: Sequence[Dict[str, str]], add_generation_prompt: bool = False) -> str:
    """A conversation as text: the tokenizer's chat template, or ``FALLBACK_TEMPLATE``.

    Example:
        >>> class Tok: eos_token = "</s>"; chat_template = None
        >>> render_chat(Tok(), [{"role": "user", "content": "hi"}], add_generation_prompt=True)
        '<|user|>\\nhi\\n<|assistant|>\\n'
    """
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                             tokenize=False)
    eos = tokenizer.eos_token or ""
    text = "".join(FALLBACK_TEMPLATE.format(role=m["role"], content=m["content"],
                                            end=eos if m["role"] == "assistant" else "")
                   for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def warn_if_fallback(tokenizer) -> None:
    """One warning when ``render_chat`` will use the fallback template.

    Example:
        >>> class Tok: chat_template = "x"
        >>> warn_if_fallback(Tok())
    """
    if not has_chat_template(tokenizer):
        warnings.warn("the tokenizer has no chat template: chat data is rendered with the "
                      "fallback template '<|role|>\\ncontent\\n' per message (see "
                      "qlora_kernels.train.data.FALLBACK_TEMPLATE)", stacklevel=2)


def _segments(tokenizer, record: dict, fmt: str) -> List[Tuple[str, bool, bool]]:
    """(text, is_target, add_special_tokens) pieces of one record, in order."""
    eos = tokenizer.eos_token or ""
    if fmt == "text":
        return [(record["text"] + eos, True, True)]
    if fmt == "prompt-completion":
        return [(record["prompt"], False, True), (record["completion"] + eos, True, False)]
    if fmt == "alpaca":
        tpl = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
        return [(tpl.format(instruction=record["instruction"], input=record.get("input", "")),
                 False, True), (record["output"] + eos, True, False)]
    msgs = record["messages"]
    segs, done = [], ""
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, msgs[:k], add_generation_prompt=True)
        full = render_chat(tokenizer, msgs[:k + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the chat template does not render each turn as a prefix of the "
                             "next; cannot mask the prompt")
        segs += [(prompt[len(done):], False, False), (full[len(prompt):], True, False)]
        done = full
    return segs


def encode(tokenizer, record: dict, fmt: str, max_len: int,
           train_on_prompt: bool = False) -> Tuple[List[int], List[int], bool]:
    """``(ids, labels, truncated)`` of one record: each piece tokenized on its own (so the
    mask follows the pieces exactly), labels -100 on non-target pieces unless
    ``train_on_prompt``, on the first token always, and cut to ``max_len`` tokens.

    Example (needs a tokenizer):
        ids, labels, cut = encode(tok, {"text": "hello"}, "text", 512)
    """
    ids: List[int] = []
    labels: List[int] = []
    for text, target, special in _segments(tokenizer, record, fmt):
        piece = tokenizer(text, add_special_tokens=special)["input_ids"]
        ids += piece
        labels += piece if (target or train_on_prompt) else [-100] * len(piece)
    if labels:
        labels[0] = -100
    return ids[:max_len], labels[:max_len], len(ids) > max_len


def encode_dataset(tokenizer, fmt: str, records: List[dict], max_len: int,
                   train_on_prompt: bool = False) -> Tuple[list, dict]:
    """Encode every record; drop those left without a target token by truncation.
    Returns ``(examples, stats)``, stats with ``examples``, ``truncated``, ``dropped``,
    ``tokens``, ``target_tokens``.

    Example (needs a tokenizer):
        examples, stats = encode_dataset(tok, "chat", records, 512)
    """
    out, truncated, dropped = [], 0, 0
    for rec in records:
        ids, labels, cut = encode(tokenizer, rec, fmt, max_len, train_on_prompt)
        truncated += cut
        if all(x == -100 for x in labels):
            dropped += 1
            continue
        out.append((ids, labels))
    return out, {"examples": len(out), "truncated": truncated, "dropped": dropped,
                 "tokens": sum(len(i) for i, _ in out),
                 "target_tokens": sum(sum(x != -100 for x in lab) for _, lab in out)}


# ----------------------------------------------------------------------------- batches
def pack(examples: Sequence[Tuple[List[int], List[int]]], max_len: int) -> list:
    """Greedy packing, in order, of examples into sequences of at most ``max_len`` tokens:
    each packed unit is ``(ids, labels, position_ids)`` with the position ids restarting
    at 0 for each example (the model then keeps attention inside each example).

    Example:
        >>> pack([([1, 2], [-100, 2]), ([3, 4, 5], [-100, 4, 5]), ([6], [-100])], 5)[0][2]
        [0, 1, 0, 1, 2]
    """
    units, cur = [], ([], [], [])
    for ids, labels in examples:
        if cur[0] and len(cur[0]) + len(ids) > max_len:
            units.append(cur)
            cur = ([], [], [])
        cur[0].extend(ids)
        cur[1].extend(labels)
        cur[2].extend(range(len(ids)))
    if cur[0]:
        units.append(cur)
    return units


def collate(batch: Sequence[tuple], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad ``(ids, labels)`` units to a batch with an attention mask; packed
    ``(ids, labels, position_ids)`` units get ``position_ids`` instead (padding counts as
    one more sequence, so the model's packed-sequence mask keeps examples apart).

    Example:
        >>> b = collate([([1, 2, 3], [-100, 2, 3]), ([4], [4])], pad_id=0)
        >>> b["input_ids"].tolist(), b["labels"][1].tolist()
        ([[1, 2, 3], [4, 0, 0]], [4, -100, -100])
    """
    n = max(len(u[0]) for u in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    packed = len(batch[0]) == 3
    pos = torch.zeros((len(batch), n), dtype=torch.long)
    for i, u in enumerate(batch):
        ids[i, :len(u[0])] = torch.tensor(u[0])
        labels[i, :len(u[1])] = torch.tensor(u[1])
        mask[i, :len(u[0])] = 1
        if packed:
            pos[i, :len(u[2])] = torch.tensor(u[2])
            pos[i, len(u[2]):] = torch.arange(n - len(u[2]))
    if packed:
        return {"input_ids": ids, "labels": labels, "position_ids": pos}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@functools.lru_cache(maxsize=4)
def _orders(n: int, seed: int, epochs: int) -> tuple:
    rng = random.Random(seed)
    out = []
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        out.append(tuple(order))
    return tuple(out)


def epoch_order(n: int, seed: int, epoch: int) -> List[int]:
    """The order of ``n`` units in epoch ``epoch`` (0-based): the ``epoch``-th shuffle of
    one ``random.Random(seed)``, so the order is a function of the seed and the epoch.

    Example:
        >>> epoch_order(4, 0, 1) == epoch_order(4, 0, 1) != epoch_order(4, 0, 0)
        True
    """
    return list(_orders(n, seed, epoch + 1)[epoch])


def microbatch(units: Sequence, batch_size: int, seed: int, index: int) -> list:
    """Micro-batch number ``index`` (0-based) of the stream that runs through the epochs'
    orders back to back: positions ``index * batch_size`` onwards.

    Example:
        >>> [len(microbatch(list(range(5)), 2, 0, i)) for i in range(4)]
        [2, 2, 2, 2]
    """
    n = len(units)
    out, cache = [], {}
    for p in range(index * batch_size, (index + 1) * batch_size):
        epoch = p // n
        if epoch not in cache:
            cache[epoch] = epoch_order(n, seed, epoch)
        out.append(units[cache[epoch][p % n]])
    return out


__all__ = ["FORMATS", "FALLBACK_TEMPLATE", "read_dataset", "detect_format", "render_chat",
           "has_chat_template", "warn_if_fallback", "encode", "encode_dataset", "pack",
           "collate", "epoch_order", "microbatch"]
