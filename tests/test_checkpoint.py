"""Heads checkpoints: our format round-trips; the original Medusa format (built here with the original's
module layout and key names) loads into heads that compute the same logits; damaged, hostile or
mismatched checkpoints are refused with a message that names the file or the numbers."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

# Formats are compared to within 1e-5: one product computed in another shape (all heads at once, one
# head alone) rounds differently on some CPUs (MKL on AMD Zen 4: ~3e-6); a wrong mapping is off by O(1).
from conftest import HIDDEN, VOCAB, random_heads, tiny_model
from medusa import MedusaModel
from medusa.inference.checkpoint import build_heads, load_heads_checkpoint, save_heads
from medusa.inference.heads import HeadsConfig, MedusaHeads
from medusa.inference.tree import DEFAULT_TREE, PRESETS, default_tree


def _prompt(seed=0, n=10):
    return torch.randint(3, 90, (1, n), generator=torch.Generator().manual_seed(seed))


def _hidden(seed=0):
    return torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _steps(m, ids, n=30):
    """What a decode did, step by step: the accepted tree nodes depend on the heads, not only the base."""
    return [(s.tokens.tolist(), s.nodes) for s in m.stream(ids, max_new_tokens=n)]


# ---------------------------------------------------------------- the original Medusa format


class OriginalResBlock(nn.Module):
    """The original's ResBlock (medusa/model/medusa_model.py): x + SiLU(linear(x))."""

    def __init__(self, hidden_size):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def original_heads(num_heads: int, num_layers: int, *, projection: bool = True, seed: int = 3) -> nn.ModuleList:
    """The original's `medusa_head`: a ModuleList of Sequential(ResBlock * L, Linear(H, V, bias=False)); its
    state_dict is what the original saves. Each layer is its own module here, so a layer mix-up shows."""
    torch.manual_seed(seed)
    heads = nn.ModuleList([
        nn.Sequential(*[OriginalResBlock(HIDDEN) for _ in range(num_layers)],
                      *([nn.Linear(HIDDEN, VOCAB, bias=False)] if projection else []))
        for _ in range(num_heads)])
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.2)
    return heads.eval()


def original_keys(num_heads, num_layers, projection=True) -> set[str]:
    keys = {f"{h}.{layer}.linear.{kind}" for h in range(num_heads) for layer in range(num_layers)
            for kind in ("weight", "bias")}
    return keys | ({f"{h}.{num_layers}.weight" for h in range(num_heads)} if projection else set())


def write_original(folder: Path, heads: nn.ModuleList, *, num_layers: int, base: str = "lmsys/vicuna-7b-v1.3",
                   claimed_heads: int | None = None, fmt: str = "safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"medusa_num_heads": claimed_heads or len(heads), "medusa_num_layers": num_layers,
              "base_model_name_or_path": base, "transformers_version": "4.33.0"}
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.detach().clone().contiguous() for k, v in heads.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(folder / "medusa_lm_head.safetensors"))
    else:
        torch.save(state, folder / "medusa_lm_head.pt")
    return folder


def original_logits(heads: nn.ModuleList, hidden, lm_head=None):
    with torch.no_grad():
        return torch.stack([head(hidden) if lm_head is None else lm_head(head(hidden)) for head in heads])


def ours_from_original(heads: nn.ModuleList, num_layers: int) -> MedusaHeads:
    """Our MedusaHeads with own projections, weights copied one by one from the original's modules."""
    ours = MedusaHeads(HeadsConfig(hidden_size=HIDDEN, vocab_size=VOCAB, num_heads=len(heads),
                                   num_layers=num_layers, shared_lm_head=False))
    with torch.no_grad():
        for mine, theirs in zip(ours.heads, heads):
            for layer in range(num_layers):
                mine.blocks[layer].linear.weight.copy_(theirs[layer].linear.weight)
                mine.blocks[layer].linear.bias.copy_(theirs[layer].linear.bias)
            mine.proj.weight.copy_(theirs[num_layers].weight)
    return ours.eval()


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("num_heads, num_layers", [(3, 1), (2, 2)])
def test_original_format_with_own_projections(tmp_path, fmt, num_heads, num_layers):
    orig = original_heads(num_heads, num_layers)
    assert set(orig.state_dict()) == original_keys(num_heads, num_layers)        # the original's key names
    folder = write_original(tmp_path / "medusa", orig, num_layers=num_layers, fmt=fmt)
    config, state, tree = load_heads_checkpoint(folder)
    assert (config.num_heads, config.num_layers, config.shared_lm_head) == (num_heads, num_layers, False)
    assert (config.hidden_size, config.vocab_size) == (HIDDEN, VOCAB)
    assert config.base_model_name_or_path == "lmsys/vicuna-7b-v1.3" and tree is None
    loaded = build_heads(config, state).eval()
    hidden = _hidden()
    with torch.no_grad():
        got = loaded(hidden)
        ours = ours_from_original(orig, num_layers)(hidden)
    want = original_logits(orig, hidden)
    assert got.shape == (num_heads, 2, 5, VOCAB)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


def test_original_format_resblocks_only_shares_the_base_projection(tmp_path):
    base = tiny_model("llama")
    orig = original_heads(4, 1, projection=False)
    assert set(orig.state_dict()) == original_keys(4, 1, projection=False)
    config, state, _ = load_heads_checkpoint(write_original(tmp_path / "medusa", orig, num_layers=1))
    assert config.shared_lm_head is True and (config.num_heads, config.num_layers) == (4, 1)
    heads = build_heads(config, state).eval()
    assert all(h.proj is None for h in heads.heads)
    hidden = _hidden(1)
    with torch.no_grad():
        got = heads(hidden, base.lm_head)
    torch.testing.assert_close(got, original_logits(orig, hidden, base.lm_head), rtol=1e-5, atol=1e-5)


def test_original_config_claiming_more_heads_than_the_weights_warns(tmp_path):
    orig = original_heads(3, 1)
    folder = write_original(tmp_path / "medusa", orig, num_layers=1, claimed_heads=5)
    with pytest.warns(UserWarning, match=r"medusa_num_heads=5 .*holds 3"):
        config, state, _ = load_heads_checkpoint(folder)
    assert config.num_heads == 3
    heads = build_heads(config, state).eval()
    assert heads.num_heads == 3
    hidden = _hidden(2)
    with torch.no_grad():
        torch.testing.assert_close(heads(hidden), original_logits(orig, hidden), rtol=1e-5, atol=1e-5)


def _side_effect(path):
    Path(path).write_text("unpickling ran code")


class _Payload:
    """Unpickling this runs `_side_effect` (what a hostile checkpoint does with os.system)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_side_effect, (self.path,))


class _Opaque:
    pass


@pytest.mark.parametrize("payload", ["code", "instance"])
def test_pickled_objects_are_refused(tmp_path, payload):
    folder = tmp_path / "medusa"
    write_original(folder, original_heads(2, 1), num_layers=1, fmt="pt")
    marker = tmp_path / "pwned"
    state = torch.load(folder / "medusa_lm_head.pt", weights_only=True)
    state["0.0.linear.weight"] = _Payload(str(marker)) if payload == "code" else _Opaque()
    torch.save(state, folder / "medusa_lm_head.pt")
    with pytest.raises(ValueError, match=r"medusa_lm_head\.pt: UnpicklingError"):     # the unpickler said no
        load_heads_checkpoint(folder)
    assert not marker.exists()


def test_pt_holding_something_other_than_a_state_dict_is_refused(tmp_path):
    folder = tmp_path / "medusa"
    write_original(folder, original_heads(2, 1), num_layers=1, fmt="pt")
    torch.save([torch.zeros(3)], folder / "medusa_lm_head.pt")           # weights_only admits a list
    with pytest.raises(ValueError, match=r"medusa_lm_head\.pt does not hold a state dict.*list"):
        load_heads_checkpoint(folder)


# ---------------------------------------------------------------- our format


@pytest.mark.parametrize("shared,next_token,parent", [(True, False, False), (False, False, False),
                                                      (True, True, False), (False, True, True)])
def test_save_then_load_gives_the_same_heads_and_the_same_decode(tmp_path, shared, next_token, parent):
    base = tiny_model("llama")
    paths = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
    m = MedusaModel(base, random_heads(num_heads=3, shared=shared, next_token=next_token, parent_token=parent),
                    tree=paths)
    m.save_pretrained(tmp_path / "heads")
    config, state, tree = load_heads_checkpoint(tmp_path / "heads")
    assert config == m.heads.config
    assert tree == {"cpu": m.tree} and m.tree == paths
    want = m.heads.state_dict()
    assert set(state) == set(want)
    for k in want:
        assert torch.equal(state[k], want[k]), k
    loaded = MedusaModel(base, build_heads(config, state).eval(), tree=tree["cpu"])
    hidden = _hidden(3)
    inputs = {"next_embeds": torch.randn(hidden.shape)} if next_token else {}
    if parent:
        inputs["parent_embeds"] = torch.randn(2, *hidden.shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded.heads(hidden, base.lm_head, **inputs), m.heads(hidden, base.lm_head, **inputs),
                                   rtol=1e-5, atol=1e-5)
    ids = _prompt(1)
    assert _steps(loaded, ids) == _steps(m, ids)
    assert torch.equal(loaded.generate(ids, max_new_tokens=30), m.generate(ids, max_new_tokens=30))


def test_tree_json_round_trip(tmp_path):
    base = tiny_model("llama")
    m = MedusaModel(base, random_heads(), tree="cpu_small")
    m.save_pretrained(tmp_path / "with_tree")
    saved = json.loads((tmp_path / "with_tree" / "tree.json").read_text())
    assert saved == {"devices": {"cpu": {"paths": [list(p) for p in m.tree]}}}     # the tree in use, where
    assert load_heads_checkpoint(tmp_path / "with_tree")[2] == {"cpu": m.tree}
    m.save_pretrained(tmp_path / "no_tree", save_tree=False)
    assert not (tmp_path / "no_tree" / "tree.json").exists()
    assert load_heads_checkpoint(tmp_path / "no_tree")[2] is None


def test_config_round_trip_keeps_extra_and_base_name(tmp_path):
    heads = random_heads(num_heads=2, shared=False)
    heads.config.base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    heads.config.extra = {"trained_on": "sharegpt", "steps": 1200}
    MedusaModel(tiny_model("llama"), heads).save_pretrained(tmp_path)
    config, _, _ = load_heads_checkpoint(tmp_path)
    assert config == heads.config and config.extra == {"trained_on": "sharegpt", "steps": 1200}


# ---------------------------------------------------------------- errors


def test_missing_folder_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_heads_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MedusaModel.from_pretrained(tmp_path / "nowhere")


def test_folder_without_heads_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a Medusa heads folder"):
        load_heads_checkpoint(tmp_path)


@pytest.mark.parametrize("field, value", [("hidden_size", "576"), ("num_heads", 2.0), ("vocab_size", True),
                                          ("shared_lm_head", "yes"), ("base_model_name_or_path", 7)])
def test_a_config_field_of_the_wrong_type_names_the_file_and_the_field(tmp_path, field, value):
    save_heads(tmp_path, random_heads())
    config = json.loads((tmp_path / "medusa_config.json").read_text())
    (tmp_path / "medusa_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=rf"medusa_config.json: {field} must be .*, not {re.escape(repr(value))}$"):
        load_heads_checkpoint(tmp_path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("fmt", ["ours", "original", "original_pt"])
def test_truncated_weights_name_the_file(tmp_path, fmt):
    folder = tmp_path / "heads"
    if fmt == "ours":
        MedusaModel(tiny_model("llama"), random_heads()).save_pretrained(folder)
        name = "heads.safetensors"
    else:
        write_original(folder, original_heads(2, 1), num_layers=1, fmt="pt" if fmt == "original_pt" else "safetensors")
        name = "medusa_lm_head.pt" if fmt == "original_pt" else "medusa_lm_head.safetensors"
    _truncate(folder / name)
    with pytest.raises(ValueError, match=re.escape(name) + ".*truncated or corrupt"):
        load_heads_checkpoint(folder)


@pytest.mark.parametrize("field, value, base_value", [("hidden_size", 32, HIDDEN), ("vocab_size", 100, VOCAB)])
def test_heads_for_another_base_are_refused(field, value, base_value):
    cfg = {"hidden_size": HIDDEN, "vocab_size": VOCAB, "num_heads": 2, field: value}
    heads = MedusaHeads(HeadsConfig(**cfg))
    with pytest.raises(ValueError, match=rf"{field.split('_')[0]}.* {value} but the base model's is {base_value}"):
        MedusaModel(tiny_model("llama"), heads)


# ---------------------------------------------------------------- end to end: from_pretrained


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    """A tiny Llama written the way transformers writes it (config, weights; no tokenizer)."""
    folder = tmp_path_factory.mktemp("base")
    tiny_model("llama").save_pretrained(folder)
    return folder


def _hf_greedy(model, ids, n):
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("trees, want", [
    ({"devices": {"cpu": {"paths": [[0], [1]]}, "cuda": {"paths": [[0], [0, 0]]}}}, [(0,), (1,)]),
    ({"devices": {"cuda": {"paths": [[0], [0, 0]]}}}, None),                   # none for this device: the default
    ({"paths": [[0], [0, 0]], "devices": {"cuda": {"paths": [[1]]}}}, [(0,), (0, 0)]),  # one for every device
    ([[2], [2, 0]], [(2,), (2, 0)]),                                           # the format before per-device trees
])
def test_the_loader_picks_the_tree_saved_for_its_device_type(tmp_path, saved_base, trees, want):
    """Calibrated trees are per device type: a CPU's 6-node tree would waste a GPU, a GPU's 64 nodes a CPU."""
    folder = tmp_path / "heads"
    save_heads(folder, MedusaHeads(HeadsConfig(hidden_size=HIDDEN, vocab_size=VOCAB, num_heads=3)))
    (folder / "tree.json").write_text(json.dumps(trees))
    logs = []
    m = MedusaModel.from_pretrained(folder, base_model=str(saved_base), log=logs.append)
    assert m.device_type == "cpu"
    assert m.tree == (want or [p for p in PRESETS[default_tree("cpu")] if len(p) <= 3])
    assert any("calibrated for cuda, not cpu" in line for line in logs) == (want is None)
    # the same file given as --tree: this device's entry, or a clear error
    if want is None:
        with pytest.raises(ValueError, match=r"has no tree for cpu \(it has: cuda\)"):
            m.generate(_prompt(), max_new_tokens=2, tree=str(folder / "tree.json"))
    else:
        assert MedusaModel(m.base_model, m.heads, tree=str(folder / "tree.json")).tree == want


@pytest.mark.parametrize("num_heads", [4, 2])
def test_heads_with_no_tree_get_a_small_one_on_a_cpu_and_say_so(tmp_path, saved_base, num_heads):
    """Heads as `medusa train` writes them (no tree.json): on a CPU, where every node costs time, the 8-node
    preset (cut to the heads), not the GPU's 64 nodes; the loader names it and `medusa calibrate`."""
    folder = tmp_path / "heads"
    save_heads(folder, MedusaHeads(HeadsConfig(hidden_size=HIDDEN, vocab_size=VOCAB, num_heads=num_heads)))
    logs = []
    m = MedusaModel.from_pretrained(folder, base_model=str(saved_base), log=logs.append)
    assert m.device_type == "cpu" and default_tree("cpu") == "cpu_8" and default_tree("cuda") == DEFAULT_TREE
    assert m.tree == [p for p in PRESETS["cpu_8"] if len(p) <= num_heads]
    assert len(m.tree) + 1 <= 8 and max(map(len, m.tree)) == min(num_heads, 3)
    said = [line for line in logs if "cpu_8" in line]
    assert len(said) == 1 and "No tree is calibrated" in said[0] and "`medusa calibrate`" in said[0]
    ids = _prompt(5)
    assert torch.equal(m.generate(ids, max_new_tokens=12), _hf_greedy(tiny_model("llama"), ids, 12))


def test_a_malformed_tree_file_names_itself(tmp_path, saved_base):
    folder = tmp_path / "heads"
    save_heads(folder, MedusaHeads(HeadsConfig(hidden_size=HIDDEN, vocab_size=VOCAB, num_heads=3)))
    (folder / "tree.json").write_text(json.dumps({"devices": {"cpu": [[0]]}}))
    with pytest.raises(ValueError, match=r"tree.json: devices.cpu has no \"paths\""):
        load_heads_checkpoint(folder)
    (folder / "tree.json").write_text(json.dumps({"tree": [[0]]}))
    with pytest.raises(ValueError, match=r"tree.json: a tree file holds a list of paths"):
        load_heads_checkpoint(folder)


@pytest.mark.parametrize("fmt", ["ours", "original", "original_shared"])
def test_from_pretrained_loads_and_decodes_like_plain_greedy(tmp_path, saved_base, fmt):
    reference = tiny_model("llama")                                    # the same weights, never saved
    heads_dir = tmp_path / "heads"
    hidden = _hidden(4)
    if fmt == "ours":
        src = MedusaModel(reference, random_heads(num_heads=3), tree=[(0,), (1,), (0, 0), (0, 0, 0)])
        src.save_pretrained(heads_dir)
        want_logits = src.heads(hidden, reference.lm_head).detach()
        want_tree = src.tree
    else:
        orig = original_heads(3, 1, projection=(fmt == "original"))
        write_original(heads_dir, orig, num_layers=1, base="does/not-matter")
        want_logits = original_logits(orig, hidden, None if fmt == "original" else reference.lm_head)
        want_tree = [p for p in PRESETS[default_tree("cpu")] if len(p) <= 3]  # no tree.json: the CPU's, cut
    m = MedusaModel.from_pretrained(heads_dir, base_model=str(saved_base))
    assert m.tokenizer is None                                         # the base folder has none
    assert m.heads.num_heads == 3 and m.heads.config.vocab_size == VOCAB
    assert m.tree == want_tree
    with torch.no_grad():
        torch.testing.assert_close(m.heads(hidden, m.base_model.lm_head), want_logits, rtol=1e-5, atol=1e-5)
    for seed in range(2):
        ids = _prompt(10 + seed)
        ref = _hf_greedy(reference, ids, 30)
        assert ref.shape == (1, ids.shape[1] + 30)
        assert torch.equal(m.generate(ids, max_new_tokens=30), ref), f"{fmt} seed {seed}"


def test_from_pretrained_finds_the_base_named_in_an_original_config(tmp_path, saved_base):
    folder = write_original(tmp_path / "heads", original_heads(2, 1), num_layers=1, base=str(saved_base))
    m = MedusaModel.from_pretrained(folder)
    ids = _prompt(20)
    assert torch.equal(m.generate(ids, max_new_tokens=20), _hf_greedy(tiny_model("llama"), ids, 20))


def test_from_pretrained_refuses_heads_of_another_size(tmp_path, saved_base):
    small = MedusaHeads(HeadsConfig(hidden_size=32, vocab_size=VOCAB, num_heads=2))
    save_heads(tmp_path / "heads", small)
    with pytest.raises(ValueError, match=r"hidden size 32 but the base model's is 64"):
        MedusaModel.from_pretrained(tmp_path / "heads", base_model=str(saved_base))


def test_from_pretrained_loads_the_base_tokenizer_when_there_is_one(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = tmp_path / "base_with_tokenizer"
    tiny_model("llama").save_pretrained(base)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0").save_pretrained(base)
    MedusaModel(tiny_model("llama"), random_heads(num_heads=2)).save_pretrained(tmp_path / "heads")
    m = MedusaModel.from_pretrained(tmp_path / "heads", base_model=str(base))
    assert m.tokenizer is not None
    assert m.tokenizer("w5 w17 w42")["input_ids"] == [5, 17, 42]
