"""Weight-only 4-bit products (quantized.py) and a GGUF file's blocks kept quantized (gguf_weights.py)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from conftest import random_heads, tiny_model
from medusa import MedusaModel
from medusa.inference import gguf_weights, loading
from medusa.inference.quantized import (GROUP, Int4Linear, QuantEmbedding, dense_weight, int8_parts,
                                        quantize_groupwise, quantize_linears)
from medusa.inference.tree_attention import rows_independent

TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K")


def _blocks(kind: str, w: np.ndarray) -> np.ndarray:
    """gguf's own quantization of an (n, k) fp32 array: the raw bytes, one row of blocks per weight row. gguf
    cannot write Q4_K: random blocks then (any bytes are valid codes and scales), with finite d and dmin."""
    if kind != "Q4_K":
        return gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, kind))
    n, k = w.shape
    rng = np.random.default_rng(0)
    b = rng.integers(0, 256, (n * k // 256, 144), dtype=np.uint8)
    b[:, 0:4] = np.ascontiguousarray(rng.uniform(0.001, 0.01, (n * k // 256, 2)).astype(np.float16)).view(np.uint8)
    return b.reshape(n, -1)


def _weight(n=48, k=256, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05


@pytest.mark.parametrize("kind", TYPES)
def test_blocks_decode_to_gguf_dequantization_exactly(kind):
    w = _weight()
    raw = _blocks(kind, w)
    ref = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind)).reshape(w.shape)
    codes, scale, zero = gguf_weights.decode_blocks(kind, raw, *w.shape)
    emb = QuantEmbedding(codes, scale, zero)
    assert torch.equal(emb.dequantize(), torch.from_numpy(ref))          # bit for bit, as embeddings need
    ids = torch.tensor([[3, 0, 47], [5, 5, 1]])
    assert torch.equal(emb(ids), torch.from_numpy(ref)[ids])


@pytest.mark.parametrize("kind", TYPES)
def test_the_kernel_weights_are_gguf_weights_within_bf16_scales(kind):
    """The kernel holds scales and zeros in bf16: each weight within a bf16 rounding of them (2^-8 relative)."""
    w = _weight()
    raw = _blocks(kind, w)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind)).reshape(w.shape))
    codes, scale, zero = gguf_weights.decode_blocks(kind, raw, *w.shape)
    lin = Int4Linear(gguf_weights.int4_parts(kind, codes, scale, zero))
    got = dense_weight(lin)
    group_max = ref.abs().reshape(ref.shape[0], -1, GROUP).amax(-1).repeat_interleave(GROUP, 1)
    assert (got - ref).abs().le(group_max * 2.0 ** -6).all()
    assert (got - ref).abs().mean() < ref.abs().mean() * 2.0 ** -7
    assert not torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("bits", [4, 8])
def test_groupwise_quantization_is_close_to_the_fp32_product(bits):
    torch.manual_seed(0)
    w, b, x = torch.randn(80, 64), torch.randn(80), torch.randn(7, 64)
    lin = Int4Linear(quantize_groupwise(w, bits), b)
    ref = nn.functional.linear(x, w, b)
    err = (lin(x) - ref).norm() / ref.norm()
    assert err < (0.1 if bits == 4 else 0.01), err
    assert lin(x).dtype == torch.float32 and lin(x[None]).shape == (1, 7, 80)
    assert lin.out_features == 80                           # 80 outputs are padded to 96 inside


def test_each_row_gets_the_bits_it_gets_alone():
    torch.manual_seed(0)
    lin = Int4Linear(quantize_groupwise(torch.randn(96, 128)))
    x = torch.randn(100, 128) ** 3
    alone = torch.cat([lin(x[i:i + 1]) for i in range(100)])
    for rows in (2, 5, 8, 16, 33, 64, 100):
        assert torch.equal(lin(x[:rows]), alone[:rows])


def test_int8_parts_are_two_halves_of_each_code():
    codes = torch.arange(-128, 128).reshape(8, 32)
    scale = torch.full((8, 1), 0.5)
    lin = Int4Linear(int8_parts(codes, scale))
    assert torch.equal(dense_weight(lin), codes.float() * 0.5)


def test_weights_that_do_not_fit_groups_are_refused():
    with pytest.raises(ValueError, match="groups of 32"):
        Int4Linear([(torch.zeros(16, 40, dtype=torch.int32), torch.ones(16, 1), torch.zeros(16, 1))])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3"])
def test_greedy_on_a_quantized_model_equals_its_generate(arch):
    model = tiny_model(arch)
    assert quantize_linears(model) > 0
    assert rows_independent(model, 16)
    m = MedusaModel(model, random_heads(), tree="cpu_small")
    for seed in range(2):
        ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(seed))
        ref = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
        assert torch.equal(m.generate(ids, max_new_tokens=40), ref)
    batch = torch.randint(3, 90, (3, 10), generator=torch.Generator().manual_seed(5))
    out = m.generate(batch, max_new_tokens=24)
    for r in range(3):
        assert torch.equal(out[r:r + 1], m.generate(batch[r:r + 1], max_new_tokens=24))


def _gguf_of(model, path, kinds, shuffled: str) -> None:
    """Write `model`'s linear and embedding weights to a GGUF file, each quantized as `kinds` cycles, the rows
    of module `shuffled` reordered; then set the model's weights to their dequantization (as loading a GGUF
    file with transformers gives them)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    for i, (name, mod) in enumerate(mods):
        kind = getattr(gguf.GGMLQuantizationType, kinds[i % len(kinds)])
        w = mod.weight.detach().numpy()
        order = np.random.default_rng(i).permutation(w.shape[0]) if name == shuffled else np.arange(w.shape[0])
        raw = gguf.quants.quantize(np.ascontiguousarray(w[order]), kind)
        writer.add_tensor(f"t{i}", raw, raw_dtype=kind)
        deq = gguf.quants.dequantize(raw, kind).reshape(w.shape)
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(deq[np.argsort(order)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_blocks_are_matched_to_layers_by_content(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=False)
    path = tmp_path / "tiny.gguf"
    _gguf_of(model, path, TYPES[:3], shuffled="model.layers.0.self_attn.q_proj")
    ref = tiny_model("llama", tie_word_embeddings=False)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(0.01)         # changed since: stays as loaded
    report = gguf_weights.keep_quantized(model, path)
    kept = {name for name, _, _ in report["kept"]}
    assert "model.layers.0.self_attn.q_proj" in kept and "model.embed_tokens" in kept and "lm_head" in kept
    assert [name for name, _ in report["dense"]] == ["model.layers.1.mlp.up_proj"]
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int4Linear)
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.model.embed_tokens(ids), ref.model.embed_tokens(ids))
    q_ref = ref.model.layers[0].self_attn.q_proj.weight
    q_got = dense_weight(model.model.layers[0].self_attn.q_proj)
    assert (q_got - q_ref).abs().max() <= q_ref.abs().max() * 2.0 ** -6     # the reordered rows found their place


def _model_file(model, path, kinds, dense: str) -> None:
    """Write `model` as a GGUF file of its architecture, as llama.cpp's converter names and orders its tensors
    (gguf's own name table; llama's query and key rows permuted): 2-D weights quantized as `kinds` cycles, the
    weight named `dense` in F16, the rest in F32."""
    cfg = model.config
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == cfg.model_type)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), cfg.model_type)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    for i, (name, p) in enumerate(model.named_parameters()):
        module, _, suffix = name.rpartition(".")
        w = p.detach().numpy()
        if cfg.model_type == "llama" and module.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if module.endswith("q_proj") else cfg.num_key_value_heads
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        gguf_name = f"{names.get_name(module)}.{suffix}"
        if w.ndim == 2 and name != dense:
            kind = getattr(gguf.GGMLQuantizationType, kinds[i % len(kinds)])
            writer.add_tensor(gguf_name, gguf.quants.quantize(w, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, w.astype(np.float16 if name == dense else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_gguf_file_loads_with_its_blocks_kept(tmp_path, arch):
    """load_model fills an empty model from the file alone: the logits of transformers' dequantized load of the
    file with its blocks then kept by content, bit for bit; its kept layers hold gguf's dequantization (within
    bf16 scales), its dense ones exactly. llama: tied embeddings, reordered query and key rows; qwen2: biases."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path / f"{arch}.gguf"
    _model_file(tiny_model(arch, tie_word_embeddings=arch == "llama"), path, TYPES[:3],
                dense="model.layers.1.mlp.down_proj.weight")
    model = gguf_weights.load_model(path, AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding, Int4Linear, QuantEmbedding)):
            want, got = ref.get_submodule(name).weight, dense_weight(module)
            assert (got - want).abs().max() <= want.abs().max() * 2.0 ** -6, name
    for name, p in model.named_parameters():
        assert torch.equal(p, ref.get_parameter(name)), name          # norms, biases, the F16 weight
    assert isinstance(model.lm_head, Int4Linear) and isinstance(model.model.embed_tokens, QuantEmbedding)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int4Linear)
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    gguf_weights.keep_quantized(ref, path)
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_quantize_options_are_checked_before_loading(tmp_path):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="one of"):
        loading.resolve_quantize("3bit", None, cpu)
    with pytest.raises(ValueError, match="not a GGUF file"):
        loading.resolve_quantize("gguf", str(tmp_path), cpu)
    with pytest.raises(ValueError, match="runs on a CPU"):
        loading.resolve_quantize("int4", None, torch.device("cuda"))
    assert loading.resolve_quantize(None, str(tmp_path), cpu) == "none"
    assert loading.resolve_quantize(None, None, cpu) == "gguf"         # the default model's Q4_1 file
    assert loading.resolve_quantize(None, None, torch.device("cuda")) == "none"


def test_a_quantized_model_refuses_to_move():
    model = tiny_model("llama")
    quantize_linears(model)
    m = MedusaModel(model, random_heads(), tree="cpu_small")
    with pytest.raises(RuntimeError, match="quantized"):
        m.to("meta")


def test_trees_are_calibrated_apart_for_4_bit_weights():
    from medusa.inference.tree import tree_for_device

    model = tiny_model("llama")
    quantize_linears(model)
    assert MedusaModel(model, random_heads(), tree="cpu_small").device_type == "cpu-int4"
    fp32, int4 = [(0,)], [(0,), (1,)]
    assert tree_for_device({"cpu": fp32, "cpu-int4": int4}, "cpu-int4") == int4
    assert tree_for_device({"cpu": fp32, "cpu-int4": int4}, "cpu") == fp32
    assert tree_for_device({"cpu": fp32}, "cpu-int4") == fp32            # the device's own, until calibrated


def test_4_bit_draft_rows_rescored_guess_as_the_dense_rows():
    """The heads' draft rows held as 4-bit codes, each guess's best rows scored again from bf16 rows: the dense
    rows' top-k within bf16 rounding, where the 4-bit codes alone swap near-ties; outputs map to token ids."""
    from medusa.inference.draft_head import DraftProjection, Int4DraftProjection

    torch.manual_seed(0)
    lm_head = Int4Linear(quantize_groupwise(torch.randn(3000, 64) * 0.1, 8))     # a GGUF Q8_0 lm_head's parts
    ids = torch.arange(1, 3000, 3)
    draft, dense = Int4DraftProjection(lm_head, ids), DraftProjection(lm_head, ids, torch.float32)
    x = torch.randn(400, 64)
    got, ref = draft(x), dense(x)

    def same_top1(logits):
        return float((logits.argmax(-1) == ref.argmax(-1)).float().mean())

    assert same_top1(got) > 0.98 and same_top1(draft.coarse(x)) < same_top1(got)
    top = ref.topk(5).indices
    torch.testing.assert_close(got.gather(-1, top), ref.gather(-1, top), atol=0.02, rtol=0.01)
    assert (got.topk(5).indices == top).float().mean() > 0.95
    assert torch.equal(draft.token_ids, ids) and draft.out_features == ids.numel()
    assert torch.equal(draft(x[:1]), got[:1]) and draft(x[None]).shape == (1, 400, ids.numel())


def test_a_quantized_base_guesses_through_4_bit_draft_rows_and_stays_exact():
    """A quantized base's heads guess through an Int4DraftProjection of its lm_head's draft rows; greedy output
    is still its generate's, token for token, with parent-token heads on a static and a dynamic tree."""
    from medusa.inference.draft_head import Int4DraftProjection
    from medusa.inference.heads import set_draft_vocab

    model = tiny_model("llama")
    quantize_linears(model)
    heads = random_heads(parent_token=True)
    counts = torch.zeros(96, dtype=torch.long)
    counts[3:70] = 1
    set_draft_vocab(heads, counts)
    for tree in ("cpu_small", "dynamic:6"):
        m = MedusaModel(model, heads, tree=tree, lookup=0)
        assert isinstance(m.draft_head, Int4DraftProjection) and m.draft_head.out_features == 67
        for seed in range(2):
            ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(seed))
            ref = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
            assert torch.equal(m.generate(ids, max_new_tokens=32), ref)

