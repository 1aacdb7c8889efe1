"""QLoRA under torch.distributed: FSDP2 fully_shard and DDP, 2 processes on gloo (CPU).

One 2-process run (this file executed as a script under a torchrun-style environment)
does every multi-process check and writes its measurements to a JSON file; the tests below
read it. quant_storage and the memory estimate are also checked in-process.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import distributed as qd
from qlora_kernels.nn.linear4bit import packed_to_storage, storage_to_packed

STEPS, R, ALPHA, BATCH, SEQ = 3, 8, 16, 4, 12
# torch 2.11's fully_shard cannot shard uint8 parameters (qd.fsdp_shards_integer_params):
# there the uint8 configurations are not run, and the save/reload check uses float32 storage.
INTEGER_SHARDS = qd.fsdp_shards_integer_params()
SAVE_LABEL = "fsdp_uint8" if INTEGER_SHARDS else "fsdp_fp32"


def _needs_integer_shards(*labels):
    if not INTEGER_SHARDS and any("uint8" in label for label in labels):
        pytest.skip(f"torch {torch.__version__}'s fully_shard cannot shard uint8 parameters "
                    "(torch >= 2.12 can); the float-storage configurations ran")


# ---------------------------------------------------------------- model shared by all ranks
def _tiny_llama():
    """A 2-layer LlamaForCausalLM whose linear layers have odd byte counts (uneven shards,
    partial blocks): hidden 42 (3 heads of 14, 1 KV head), intermediate 75. Skips the
    calling test when transformers (an optional extra) is not installed."""
    transformers = pytest.importorskip("transformers")
    LlamaConfig, LlamaForCausalLM = transformers.LlamaConfig, transformers.LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=42, intermediate_size=75, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float(), cfg


def _prepared(quant_storage=torch.uint8):
    model, _ = _tiny_llama()
    qk.prepare_model(model, target_modules="all-linear", r=R, lora_alpha=ALPHA,
                     compute_dtype=torch.float32, verbose=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B != 0 so that every adapter gets a gradient from step one
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return qd.set_quant_storage(model, quant_storage)


def _batch():
    return torch.randint(0, 96, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))


def _adapters(sd):
    return {k: v.float() for k, v in sd.items() if "lora_" in k}


def _train(model, ids, reduce_loss=lambda t: t):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        frozen_grads = [m.weight.grad for m in model.modules() if isinstance(m, qk.Linear4bit)]
        assert all(g is None for g in frozen_grads), "a frozen 4-bit weight got a gradient"
        opt.step()
        opt.zero_grad()
        losses.append(reduce_loss(loss.detach().clone()).item())
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    return losses, len(opt.state), n_trainable


def _worker(out_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    ids = _batch()
    mine = ids.chunk(ws)[rank]

    def mean(t):
        dist.all_reduce(t)
        return t / ws

    res = {"rank": rank}
    if rank == 0:
        ref = _prepared()
        res["ref_losses"], _, _ = _train(ref, ids)
        ref_ad = _adapters(ref.state_dict())

    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for label, storage, mp in (("fsdp_uint8", torch.uint8, None),
                               ("fsdp_fp32", torch.float32, None),
                               ("mp_bf16_uint8", torch.uint8, bf16),
                               ("mp_bf16_bf16", torch.bfloat16, bf16)):
        if storage == torch.uint8 and not INTEGER_SHARDS:
            continue
        model = _prepared(storage)
        kw = {} if mp is None else {"mp_policy": mp}
        for block in model.model.layers:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        res[label + "_bytes"] = qd.local_shard_bytes(model)
        res[label + "_losses"], res[label + "_opt_state"], res["n_trainable"] = \
            _train(model, mine, mean)
        sd = qd.full_state_dict(model)
        if rank == 0:
            ad = _adapters(sd)
            res[label + "_adapter_maxdiff"] = max((ad[k] - ref_ad[k]).abs().max().item()
                                                  for k in ref_ad)
            res[label + "_weight_dtypes"] = sorted({str(v.dtype) for k, v in sd.items()
                                                    if k.endswith("base_layer.weight")})
        if label == SAVE_LABEL:
            d = os.path.dirname(out_path)
            qd.save_full_state_dict(model, os.path.join(d, "full.safetensors"))
            qd.save_adapter_rank0(model, os.path.join(d, "adapter"))
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            if rank == 0:
                fresh = _prepared()  # fresh random LoRA init and its own quantization
                fresh.load_state_dict(qk.load_quantized(os.path.join(d, "full.safetensors")))
                with torch.no_grad():
                    res["reload_logits_equal"] = torch.equal(fresh(input_ids=ids).logits, logits)
                fresh2 = _prepared()
                qk.load_adapter(fresh2, os.path.join(d, "adapter"))
                ad2 = _adapters(fresh2.state_dict())
                res["adapter_file_maxdiff"] = max((ad2[k] - ad[k]).abs().max().item() for k in ad)
        del model

    model = DDP(_prepared())
    res["ddp_losses"], res["ddp_opt_state"], _ = _train(model, mine, mean)
    if rank == 0:
        ad = _adapters(model.module.state_dict())
        res["ddp_adapter_maxdiff"] = max((ad[k] - ref_ad[k]).abs().max().item() for k in ref_ad)
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


# ---------------------------------------------------------------- the 2-process run
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    pytest.importorskip("transformers")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = str(tmp_path_factory.mktemp("fsdp") / "result.json")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, out], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the 2-process FSDP run timed out")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"a rank failed:\n{log[-4000:]}"
    return [json.load(open(f"{out}.{r}")) for r in range(2)], os.path.dirname(out)


def _close(a, b, rel=1e-5):
    return all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b)) and len(a) == len(b)


@pytest.mark.parametrize("label", ["fsdp_uint8", "fsdp_fp32", "ddp"])
def test_two_ranks_match_one_process(two_ranks, label):
    _needs_integer_shards(label)
    (r0, r1), _ = two_ranks
    assert _close(r0[label + "_losses"], r0["ref_losses"]), (r0[label + "_losses"], r0["ref_losses"])
    assert r0[label + "_losses"] == r1[label + "_losses"]  # the averaged loss, on every rank
    assert r0[label + "_adapter_maxdiff"] <= 1e-5
    # the optimizer holds state for the adapters only: frozen 4-bit weights get none
    assert r0[label + "_opt_state"] == r0["n_trainable"] == 2 * 7 * 2


def test_mixed_precision_leaves_the_packed_bytes_alone(two_ranks):
    # MixedPrecisionPolicy(param_dtype=bf16): a uint8 weight is not cast, a bf16-stored one
    # is already bf16; both give the same training, close to float32 (bf16 compute)
    _needs_integer_shards("mp_bf16_uint8")
    (r0, _), _ = two_ranks
    assert r0["mp_bf16_uint8_losses"] == r0["mp_bf16_bf16_losses"]
    assert _close(r0["mp_bf16_bf16_losses"], r0["ref_losses"], rel=2e-2)
    assert r0["mp_bf16_bf16_weight_dtypes"] == ["torch.uint8"]


def test_sharded_state_dict_is_uint8_bitsandbytes_layout(two_ranks):
    (r0, _), _ = two_ranks
    assert r0["fsdp_fp32_weight_dtypes"] == r0["mp_bf16_bf16_weight_dtypes"] == ["torch.uint8"]
    _needs_integer_shards("fsdp_uint8")
    assert r0["fsdp_uint8_weight_dtypes"] == ["torch.uint8"]


def test_save_on_rank0_reload_in_one_process(two_ranks):
    (r0, _), d = two_ranks
    assert r0["reload_logits_equal"]
    assert r0["adapter_file_maxdiff"] == 0.0
    assert sorted(os.listdir(os.path.join(d, "adapter"))) == ["adapter_config.json",
                                                             "adapter_model.safetensors"]


def _tiny_shapes():
    return (42, 75, 2, 1 / 3)  # hidden, intermediate, layers, kv fraction (1 of 3 heads)


@pytest.mark.parametrize("label", ["fsdp_uint8", "fsdp_fp32"])
def test_each_rank_holds_half_the_packed_bytes(two_ranks, label):
    _needs_integer_shards(label)
    (r0, r1), _ = two_ranks
    b0, b1 = r0[label + "_bytes"], r1[label + "_bytes"]
    total = b0["packed_4bit_total"]
    # FSDP2 splits dim 0 with torch.chunk: rank 0 gets ceil(rows/2) rows, rank 1 the rest
    want = {"packed_4bit": [0, 0], "adapters": [0, 0]}
    storage = torch.uint8 if label == "fsdp_uint8" else torch.float32
    for name, p in _prepared(storage).named_parameters():
        kind = "adapters" if "lora_" in name else "packed_4bit" if p.dtype == storage and \
            name.endswith("base_layer.weight") else None
        if kind:
            row = p[0].numel() * p.element_size()
            want[kind][0] += -(-p.shape[0] // 2) * row
            want[kind][1] += (p.shape[0] // 2) * row
    for kind, (w0, w1) in want.items():
        assert [b0[kind], b1[kind]] == [w0, w1], kind
    assert abs(b0["packed_4bit"] - total / 2) <= 14 * storage.itemsize
    assert b0["quant_state"] == b1["quant_state"] > 0  # replicated
    # and the estimate in memory.py predicts the per-rank bytes at this scale
    n_q = 2 * (2 * 42 * 42 + 2 * 42 * 14 + 3 * 42 * 75)
    est = qk.estimate_memory(n_q, r=R, lora_bytes=4, world_size=2, fsdp=True,
                             shapes=_tiny_shapes())
    assert abs(est.weights_sharded_gb * 1e9 - total / 2) <= 14
    assert abs(est.lora_weights_gb * 1e9 - (b0["adapters"] + b1["adapters"])) < 1e-3
    assert abs(est.quant_state_gb * 1e9 - b0["quant_state"]) < 0.01 * b0["quant_state"]
    assert abs(est.lora_weights_gb * 1e9 / 2 - b0["adapters"]) <= 14 * R * 4 / 2


# ---------------------------------------------------------------- in-process checks
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(77, 333), (63, 1), (64, 64)])
def test_quant_storage_same_bytes_same_results(storage, shape, rng):
    lin = torch.nn.Linear(shape[1], shape[0])
    ref = qk.Linear4bit.from_linear(lin, compute_dtype=torch.float32)
    l4 = qk.Linear4bit.from_linear(lin, compute_dtype=torch.float32, quant_storage=storage)
    nbytes = (shape[0] * shape[1] + 1) // 2
    assert l4.weight.dtype == storage and not l4.weight.requires_grad
    assert l4.weight.shape == (-(-nbytes // storage.itemsize), 1)
    assert torch.equal(l4.packed_weight, ref.weight)
    x = torch.randn(5, shape[1], generator=rng, requires_grad=True)
    y = l4(x)
    assert torch.equal(y, ref(x))
    y.sum().backward()
    assert x.grad is not None and l4.weight.grad is None
    sd = l4.state_dict()
    assert sd["weight"].dtype == torch.uint8 and torch.equal(sd["weight"], ref.weight)
    assert set(sd) == set(ref.state_dict())
    # dtype casts leave the bytes alone, whatever the storage dtype
    l4.to(torch.bfloat16).to(torch.float16).float()
    assert l4.weight.dtype == storage and torch.equal(l4.packed_weight, ref.weight)
    # a state dict in uint8 or in the storage dtype loads into any quant_storage
    for other in (torch.uint8, torch.float32):
        fresh = qk.Linear4bit(shape[1], shape[0], compute_dtype=torch.float32,
                              quant_storage=other)
        fresh.load_state_dict(sd)
        assert fresh.weight.dtype == other and torch.equal(fresh(x), ref(x))
    raw = {**sd, "weight": l4.weight.detach()}
    fresh = qk.Linear4bit(shape[1], shape[0], compute_dtype=torch.float32)
    fresh.load_state_dict(raw)
    assert torch.equal(fresh.weight, ref.weight)


def test_quant_storage_round_trip_and_errors(rng):
    b = torch.randint(0, 256, (7, 1), dtype=torch.uint8, generator=rng)
    for dt in (torch.bfloat16, torch.float32):
        s = packed_to_storage(b, dt)
        assert s.dtype == dt and s.shape == (-(-7 // dt.itemsize), 1)
        assert torch.equal(storage_to_packed(s, 7), b)
    with pytest.raises(ValueError, match="expected 7"):
        storage_to_packed(torch.zeros(4, 1), 7)  # 16 bytes: not 7 plus padding
    with pytest.raises(ValueError, match="quant_storage"):
        qk.Linear4bit(8, 8, quant_storage=torch.int32)
    l4 = qk.Linear4bit(64, 32, quant_storage=torch.float32)
    repr(l4)
    # what FSDP mixed precision would do to float-stored bytes is caught, not computed on
    l4.weight = torch.nn.Parameter(l4.weight.detach().to(torch.bfloat16), requires_grad=False)
    with pytest.raises(RuntimeError, match="param_dtype"):
        l4(torch.randn(2, 64))


def test_single_process_helpers_on_a_plain_model(tmp_path, rng):
    model = qd.set_quant_storage(_prepared(), torch.bfloat16)
    sd = qd.full_state_dict(model)
    assert all(v.dtype == torch.uint8 for k, v in sd.items() if k.endswith("base_layer.weight"))
    qd.save_full_state_dict(model, str(tmp_path / "m.safetensors"))
    fresh = _prepared()
    fresh.load_state_dict(qk.load_quantized(str(tmp_path / "m.safetensors")))
    ids = _batch()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    b = qd.local_shard_bytes(model)
    assert b["packed_4bit"] == b["packed_4bit_total"] + sum(
        (-m.packed_nbytes) % 2 for m in model.modules() if isinstance(m, qk.Linear4bit))
    assert len(qd.decoder_layers(model)) == 2


def test_shard_model_refuses_integer_storage_where_fully_shard_cannot(monkeypatch):
    model = torch.nn.Sequential(qk.Linear4bit(64, 32), qk.Linear4bit(32, 16))
    monkeypatch.setattr(qd, "fsdp_shards_integer_params", lambda: False)
    with pytest.raises(ValueError, match=r"'0\.weight'.*set_quant_storage"):
        qd.shard_model(model, layers=[])  # refused before any fully_shard call
    qd.check_fsdp_storage(qd.set_quant_storage(model, torch.bfloat16))
    monkeypatch.setattr(qd, "fsdp_shards_integer_params", lambda: True)
    qd.check_fsdp_storage(qd.set_quant_storage(model, torch.uint8))


def test_fsdp_memory_estimate():
    full = qk.estimate_memory(70e9)
    one = qk.estimate_memory(70e9, fsdp=True)
    assert abs(one.total_gb - full.total_gb) < 1e-3  # one device: the same but for the tables
    eight = qk.estimate_memory(70e9, world_size=8, fsdp=True)
    assert abs(eight.weights_sharded_gb - 70e9 * 0.5 / 8 / 1e9) < 1e-9
    assert abs(eight.quant_state_gb - (one.weights_nf4_dq_gb - 35.0)) < 1e-3  # + tables
    assert eight.unsharded_layers_gb > 0 and eight.total_gb < one.total_gb / 4
    # the plain world_size estimate is unchanged
    assert qk.estimate_memory(70e9, world_size=8).unsharded_layers_gb == 0.0


if __name__ == "__main__":  # a rank of the 2-process run (env: RANK, WORLD_SIZE, MASTER_*)
    _worker(sys.argv[1])
