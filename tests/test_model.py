"""Our Mistral/Mixtral against transformers (the oracle), HF directories in and out, packing, upcycling."""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from model import ModelArgs, MoEArgs, Transformer, load_hf, save_hf, upcycle
from model import hf as hf_mod

torch.manual_seed(0)


def _hf_config(moe: bool, **kw):
    common = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=256,
                  tie_word_embeddings=False)
    common.update(kw)
    if moe:
        return transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common)
    return transformers.MistralConfig(**common)


def _hf_model(moe: bool, **kw):
    cls = transformers.MixtralForCausalLM if moe else transformers.MistralForCausalLM
    m = cls(_hf_config(moe, **kw)).eval()
    # HF's init leaves norms at 1 and small weights: perturb everything so a wrong mapping cannot hide.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("moe", [False, True], ids=["mistral", "mixtral"])
@pytest.mark.parametrize("window,T", [(None, 17), (5, 17), (None, 1)], ids=["full-odd", "window<T", "T=1"])
def test_hf_to_ours_logits(tmp_path, moe, window, T):
    ref = _hf_model(moe, sliding_window=window, attn_implementation="eager")
    ref.save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2

    ours = load_hf(tmp_path, dtype=torch.float32).eval()
    assert ours.args.n_kv_heads == 2 and ours.args.sliding_window == window
    tokens = torch.randint(0, 97, (2, T))
    with torch.no_grad():
        expect = ref(tokens).logits
        got = ours.logits(ours(tokens))
    assert _rel(got, expect) <= 1e-5


def test_window_changes_output(tmp_path):
    """Guard against a window test that passes because the window is never applied."""
    ref = _hf_model(False, sliding_window=4)
    ref.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    tokens = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        windowed = ours(tokens)
        ours.args.sliding_window = None
        full = ours(tokens)
    assert torch.allclose(windowed[:, :4], full[:, :4], atol=1e-6)
    assert not torch.allclose(windowed[:, 4:], full[:, 4:], atol=1e-4)


def test_mixtral_aux_loss_matches_hf(tmp_path):
    ref = _hf_model(True, output_router_logits=True)
    ref.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    tokens = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        expect = ref(tokens, output_router_logits=True).aux_loss
        _, aux = ours.forward_with_aux(tokens)
    assert _rel(aux, expect) <= 1e-5


@pytest.mark.parametrize("moe", [False, True], ids=["mistral", "mixtral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ours_to_hf_roundtrip(tmp_path, moe, dtype):
    src = _hf_model(moe)
    src.save_pretrained(tmp_path / "src", max_shard_size="30KB")
    ours = load_hf(tmp_path / "src", dtype=dtype).eval()
    save_hf(ours, tmp_path / "out", max_shard_size="30KB")

    # Same tensor names and shapes as the directory transformers wrote.
    src_idx = json.loads((tmp_path / "src/model.safetensors.index.json").read_text())["weight_map"]
    out_idx = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(src_idx) == sorted(out_idx)

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype).eval()
    assert type(back).__name__ == ("MixtralForCausalLM" if moe else "MistralForCausalLM")
    assert next(back.parameters()).dtype == dtype
    for f in (tmp_path / "out").glob("*.safetensors"):
        assert all(t.dtype == dtype for t in load_file(f).values())
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        hf_logits = back(tokens).logits.float()
        our_logits = ours.logits(ours(tokens)).float()
        # The oracle for both: fp32 arithmetic on the very same (possibly bf16-rounded) weights.
        back32, ours32 = back.float(), load_hf(tmp_path / "out", dtype=torch.float32).eval()
        exact = back32(tokens).logits
        assert _rel(ours32.logits(ours32(tokens)), exact) <= 1e-5
    if dtype == torch.float32:
        assert _rel(our_logits, hf_logits) <= 1e-5
    else:  # bf16: our rounding error at most HF's own (plus slack for a different summation order)
        assert _rel(our_logits, exact) <= 1.5 * _rel(hf_logits, exact) + 1e-3


def test_single_file_save_and_reload(tmp_path):
    src = _hf_model(False)
    src.save_pretrained(tmp_path / "src")
    ours = load_hf(tmp_path / "src")
    save_hf(ours, tmp_path / "out")
    assert (tmp_path / "out/model.safetensors").exists()
    again = load_hf(tmp_path / "out")
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_packed_equals_separate():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=50,
                     rope_theta=10000.0, moe=MoEArgs(num_experts=4, num_experts_per_tok=2))
    m = Transformer(args).init_weights(std=0.1).eval()
    docs = [torch.randint(0, 50, (n,)) for n in (5, 9, 3)]
    tokens = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = m(tokens, positions, doc_ids)[0]
        alone = torch.cat([m(d[None])[0] for d in docs])
    assert _rel(packed, alone) <= 1e-5


def test_upcycled_equals_dense():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8, hidden_dim=64, vocab_size=50)
    dense = Transformer(args).init_weights(std=0.1).eval()
    moe = upcycle(dense, num_experts=2, top_k=2).eval()
    assert moe.args.moe.num_experts == 2 and moe.layers[0].feed_forward.w13.shape == (2, 128, 32)
    tokens = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        assert _rel(moe.logits(moe(tokens)), dense.logits(dense(tokens))) <= 1e-5
    with pytest.raises(ValueError, match="dense"):
        upcycle(moe, 2)


def test_save_is_atomic(tmp_path, monkeypatch):
    src = _hf_model(False)
    src.save_pretrained(tmp_path / "src")
    ours = load_hf(tmp_path / "src")
    save_hf(ours, tmp_path / "out", max_shard_size="30KB")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())

    calls = {"n": 0}

    def crashing_save(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash mid-save")
        return save_file(*a, **kw)

    monkeypatch.setattr(hf_mod, "save_file", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_hf(ours, tmp_path / "out", max_shard_size="30KB")
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        save_hf(ours, tmp_path / "fresh", max_shard_size="30KB")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before  # old checkpoint intact
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []  # no leftovers


# ---------------------------------------------------------------- bad input


@pytest.fixture
def saved(tmp_path):
    _hf_model(True).save_pretrained(tmp_path, max_shard_size="30KB")
    return tmp_path


def test_meta_load_reads_no_weight_but_checks_the_directory(saved):
    """device="meta" (sharding before the weights arrive): the model's shapes and dtype, no storage; the
    directory is still checked."""
    m = load_hf(saved, dtype=torch.bfloat16, device="meta")
    full = load_hf(saved)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in m.parameters())
    assert [(n, p.shape) for n, p in m.named_parameters()] == [(n, p.shape) for n, p in full.named_parameters()]
    next(saved.glob("model-*.safetensors")).unlink()
    with pytest.raises(ValueError, match="missing"):
        load_hf(saved, device="meta")


def test_missing_shard(saved):
    victim = sorted(saved.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ValueError, match=victim.name):
        load_hf(saved)


def test_missing_tensor(saved):
    idx = json.loads((saved / "model.safetensors.index.json").read_text())
    f = saved / idx["weight_map"]["model.norm.weight"]
    tensors = load_file(f)
    del tensors["model.norm.weight"]
    save_file(tensors, f) if tensors else f.unlink()
    del idx["weight_map"]["model.norm.weight"]
    (saved / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_hf(saved)


def test_unexpected_tensor(saved):
    idx = json.loads((saved / "model.safetensors.index.json").read_text())
    save_file({"model.extra.weight": torch.ones(3)}, saved / "extra.safetensors")
    idx["weight_map"]["model.extra.weight"] = "extra.safetensors"
    (saved / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="model.extra.weight") as err:
        load_hf(saved)
    assert "for a Mixtral config" in str(err.value)  # the message names the model kind, not a function


def test_shape_disagrees_with_config(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        load_hf(saved)


def test_unsupported_model_type(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "llama"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="llama"):
        load_hf(saved)


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_hf(tmp_path / "nope")


def test_bad_args():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(n_heads=6, n_kv_heads=4)
