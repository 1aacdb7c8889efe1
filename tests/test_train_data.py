"""``qlora-kernels train`` data: each format's rendering and completion-only labels,
checked token by token against labels built here from hand-written template text; the
fallback template; truncation; packing (position ids restart, no attention across
examples). Needs the demo model's tokenizer (skips cleanly without it)."""
import json

import pytest
import torch

from qlora_kernels.train.data import (collate, encode, encode_dataset, microbatch, pack,
                                      read_dataset)
from train_tiny import require_packages, tokenizer, write_jsonl

# SmolLM2-Instruct's chat template, written out by hand (with its default system prompt).
SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
          "Hugging Face<|im_end|>\n")


@pytest.fixture(scope="module")
def tok():
    require_packages()
    return tokenizer()


def _expected(tok, pieces):
    """ids and labels from (text, is_target, add_special_tokens) pieces; first label -100."""
    ids, labels = [], []
    for text, target, special in pieces:
        t = tok(text, add_special_tokens=special)["input_ids"]
        ids += t
        labels += t if target else [-100] * len(t)
    labels[0] = -100
    return ids, labels


def test_chat_single_turn(tok):
    rec = {"messages": [{"role": "user", "content": "Capital of France?"},
                        {"role": "assistant", "content": "ANSWER: Paris"}]}
    ids, labels, cut = encode(tok, rec, "chat", 512)
    want = _expected(tok, [(SYSTEM + "<|im_start|>user\nCapital of France?<|im_end|>\n"
                            "<|im_start|>assistant\n", False, False),
                           ("ANSWER: Paris<|im_end|>\n", True, False)])
    assert (ids, labels) == want and not cut
    assert tok.decode([t for t in labels if t != -100]) == "ANSWER: Paris<|im_end|>\n"


def test_chat_multi_turn_trains_on_every_assistant_turn(tok):
    rec = {"messages": [{"role": "system", "content": "Be terse."},
                        {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4"},
                        {"role": "user", "content": "3+3?"},
                        {"role": "assistant", "content": "6"}]}
    ids, labels, _ = encode(tok, rec, "chat", 512)
    want = _expected(tok, [
        ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
         "<|im_start|>assistant\n", False, False), ("4<|im_end|>\n", True, False),
        ("<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n", False, False),
        ("6<|im_end|>\n", True, False)])
    assert (ids, labels) == want


def test_train_on_prompt_keeps_every_label(tok):
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ids, labels, _ = encode(tok, rec, "chat", 512, train_on_prompt=True)
    assert labels == [-100] + ids[1:]


def test_prompt_completion(tok):
    ids, labels, _ = encode(tok, {"prompt": "2+2=", "completion": " 4"}, "prompt-completion", 512)
    assert (ids, labels) == _expected(tok, [("2+2=", False, True), (" 4<|im_end|>", True, False)])


@pytest.mark.parametrize("inp", ["", "a list: 3, 1, 2"])
def test_alpaca(tok, inp):
    rec = {"instruction": "Sort the numbers.", "input": inp, "output": "1, 2, 3"}
    ids, labels, _ = encode(tok, rec, "alpaca", 512)
    head = ("Below is an instruction that describes a task" +
            (", paired with an input that provides further context" if inp else "") +
            ". Write a response that appropriately completes the request.\n\n"
            "### Instruction:\nSort the numbers.\n\n" +
            (f"### Input:\n{inp}\n\n" if inp else "") + "### Response:\n")
    assert (ids, labels) == _expected(tok, [(head, False, True), ("1, 2, 3<|im_end|>", True, False)])


def test_text(tok):
    ids, labels, _ = encode(tok, {"text": "Plain prose, all of it a target."}, "text", 512)
    want = tok("Plain prose, all of it a target.<|im_end|>")["input_ids"]
    assert ids == want and labels == [-100] + want[1:]


def test_fallback_template_on_a_tokenizer_without_one(tok, recwarn):
    bare = tokenizer(chat_template=False)
    assert not bare.chat_template
    rec = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"},
                        {"role": "assistant", "content": "A."}]}
    ids, labels, _ = encode(bare, rec, "chat", 512)
    assert (ids, labels) == _expected(bare, [("<|system|>\nS\n<|user|>\nQ?\n<|assistant|>\n", False, False),
                                             ("A.<|im_end|>\n", True, False)])


def test_truncation_is_counted_and_empty_targets_dropped(tok):
    long = {"messages": [{"role": "user", "content": "word " * 200},
                         {"role": "assistant", "content": "reply"}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "reply " * 50}]}
    ex, stats = encode_dataset(tok, "chat", [long, short], 40)
    assert stats["truncated"] == 2 and stats["dropped"] == 1 and len(ex) == 1
    assert len(ex[0][0]) == 40 and ex[0][1][-1] != -100


def test_read_dataset_detects_each_format(tmp_path):
    rows = {"chat": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "prompt-completion": {"prompt": "p", "completion": "c"},
            "alpaca": {"instruction": "i", "output": "o"}, "text": {"text": "t"}}
    for fmt, row in rows.items():
        assert read_dataset(write_jsonl(tmp_path / f"{fmt}.jsonl", [row, row]))[0] == fmt
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [rows["text"], rows["alpaca"]])
    with pytest.raises(ValueError, match=r"mixed\.jsonl, line 2: a alpaca record in a text file"):
        read_dataset(mixed)


def test_pack_restarts_positions_and_masks_boundaries():
    examples = [([11, 12, 13], [-100, 12, 13]), ([21, 22], [-100, 22]), ([31, 32, 33, 34], [-100, 32, 33, 34])]
    units = pack(examples, 6)
    assert units == [([11, 12, 13, 21, 22], [-100, 12, 13, -100, 22], [0, 1, 2, 0, 1]),
                     ([31, 32, 33, 34], [-100, 32, 33, 34], [0, 1, 2, 3])]
    b = collate(units, pad_id=0)
    assert "attention_mask" not in b
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert b["labels"][1].tolist() == [-100, 32, 33, 34, -100]


def test_packed_sequences_do_not_attend_across_examples(tmp_path):
    """Logits of two examples packed in one row equal their logits run alone."""
    require_packages()
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    a, b = torch.randint(0, 97, (7,)).tolist(), torch.randint(0, 97, (5,)).tolist()
    batch = collate(pack([(a, a), (b, b)], 16), pad_id=0)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits[0]  # a cache turns off packed-sequence masking
        alone_a = model(input_ids=torch.tensor([a])).logits[0]
        alone_b = model(input_ids=torch.tensor([b])).logits[0]
    torch.testing.assert_close(packed[:7], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[7:], alone_b, rtol=1e-5, atol=1e-5)


def test_data_order_is_a_function_of_seed_and_position():
    units = list(range(7))
    stream = [x for i in range(7) for x in microbatch(units, 3, 5, i)]
    assert sorted(stream[:7]) == units and sorted(stream[7:14]) == units  # each epoch a permutation
    assert stream[7:14] != stream[:7]
    assert microbatch(units, 3, 5, 4) == stream[12:15]  # any position on its own, no state
    assert [x for i in range(7) for x in microbatch(units, 3, 6, i)] != stream
