"""Candidate trees: named presets, JSON files, dynamic trees, and the pure functions that turn a tree into its
buffers.

A tree is a list of paths (or a `DynamicTree`, whose paths are chosen afresh each step). A path `(r1, r2, ..., rd)` is a node at depth d: its token is the r_d-th best
guess (top-k rank, from 0) of head d-1, and its parent is the path without its last element. The root
(depth 0, the empty path) is the base model's own next token and is always present.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import operator
import os
from dataclasses import dataclass
from pathlib import Path

import torch

Path_ = tuple[int, ...]

# The original Medusa's default tree for 4 heads (`medusa_choices.py`): same paths, same order.
MC_SIM_7B_63: list[Path_] = [tuple(p) for p in [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5],
    [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8], [9],
    [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1],
    [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0],
    [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0],
    [0, 0, 0, 1], [1, 6], [0, 7, 0],
]]

PRESETS: dict[str, list[Path_]] = {
    "mc_sim_7b_63": MC_SIM_7B_63,
    # One guess per head: the cheapest tree, and the right one when heads are very accurate.
    "chain": [(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)],
    # A small tree for CPUs, where each extra node costs real time: 15 nodes.
    "cpu_small": [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0),
                  (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 2)],
    "root": [],  # no candidates: plain one-token-per-step decoding on the same engine
    # 8 nodes: the first 7 paths of mc_sim_7b_63, whose paths come in the order the greedy construction adds
    # them (the likeliest accepted first), so this is its best tree of 8 nodes. What heads decode with on a CPU
    # until `medusa calibrate` fits a tree, since a CPU pays for every node (benchmarks/README.md, "Component
    # timings"); the default heads' CPU calibration chose this tree's first 5 paths.
    "cpu_8": MC_SIM_7B_63[:7],
}
DEFAULT_TREE = "mc_sim_7b_63"
CPU_TREE = "cpu_8"
DYNAMIC = "dynamic:"   # "dynamic:N": a DynamicTree of N nodes


@dataclass(frozen=True)
class DynamicTree:
    """A tree of `nodes` nodes (root included) chosen afresh at each step from the heads' own confidence: the
    `nodes - 1` most probable paths, a path's probability being the product of its heads' probabilities for
    its guesses (`most_likely_paths`; EAGLE-2's dynamic draft tree, here over Medusa heads' top-k). A static
    tree spends its nodes where guesses are right on average; this one where this step's guesses look right:
    a confident head 1 gets a deep chain, an unsure one several siblings. Each head considers its `topk` best
    guesses. For heads whose guesses follow their parent's token, a node's children are its head's guesses
    after that node's own token (dynamic.py grows such trees level by level)."""
    nodes: int
    topk: int = 10

    def __post_init__(self):
        if self.nodes < 1 or self.topk < 1:
            raise ValueError(f"a dynamic tree needs nodes >= 1 and topk >= 1, got {self.nodes} and {self.topk}")

    @property
    def num_nodes(self) -> int:
        return self.nodes

    def depth(self, num_heads: int) -> int:
        """How many heads a step's tree can use (a chain of nodes - 1 at most)."""
        return min(num_heads, self.nodes - 1)

    def __str__(self) -> str:
        return f"{DYNAMIC}{self.nodes}"


Tree = list[Path_] | DynamicTree


def most_likely_paths(probs, budget: int) -> list[Path_]:
    """`probs[d][r]`: the chance that head d's rank-r guess is right (a (K, R) tensor or nested lists). -> the
    `budget - 1` paths of highest probability (products along the path): the paper's greedy tree
    construction, and a DynamicTree's choice at each step. A child never beats its parent (probabilities are
    <= 1), so every chosen path's parent is chosen before it; ties go to the lexicographically smaller path."""
    probs = probs.tolist() if isinstance(probs, torch.Tensor) else probs
    K = len(probs)
    heap = [(-p, (r,)) for r, p in enumerate(probs[0])] if K else []
    heapq.heapify(heap)
    tree = []
    while heap and len(tree) < budget - 1:
        neg, path = heapq.heappop(heap)
        tree.append(path)
        if len(path) < K:
            for r, p in enumerate(probs[len(path)]):
                heapq.heappush(heap, (neg * p, path + (r,)))
    return tree


def tree_nodes(tree: Tree) -> int:
    """Nodes a step verifies, root included (a dynamic tree's budget)."""
    return tree.nodes if isinstance(tree, DynamicTree) else len(tree) + 1


def tree_label(tree: Tree) -> str:
    """A tree's size for people: "6 nodes", or "6 nodes (dynamic)"."""
    return f"{tree_nodes(tree)} nodes" + (" (dynamic)" if isinstance(tree, DynamicTree) else "")


def tree_spec(tree: Tree):
    """What a tree is in JSON: its paths, or "dynamic:N"."""
    return str(tree) if isinstance(tree, DynamicTree) else [list(p) for p in tree]


def tree_digest(tree: Tree) -> str:
    """12 hex digits that tell trees apart (a hash of `tree_spec`), as run settings record them."""
    return hashlib.sha1(json.dumps(tree_spec(tree)).encode()).hexdigest()[:12]


def tree_fingerprint(tree: Tree) -> str:
    """A short name that tells trees apart: "dynamic:6", or "6 nodes <tree_digest>"."""
    if isinstance(tree, DynamicTree):
        return str(tree)
    return f"{tree_nodes(tree)} nodes {tree_digest(tree)}"


def validate_tree(paths: Tree, num_heads: int | None = None) -> Tree:
    """Check a tree is well formed: every node's parent is present, ranks are >= 0, no duplicates."""
    if isinstance(paths, DynamicTree):
        return paths
    paths = [_ranks(p) for p in paths]
    present = set(paths)
    if len(present) != len(paths):
        raise ValueError("tree has duplicate paths")
    for p in paths:
        if not p or any(r < 0 for r in p):
            raise ValueError(f"tree path {list(p)} is empty or has a negative rank")
        if len(p) > 1 and p[:-1] not in present:
            raise ValueError(f"tree path {list(p)} has no parent {list(p[:-1])} in the tree")
    depth = max((len(p) for p in paths), default=0)
    if num_heads is not None and depth > num_heads:
        raise ValueError(f"tree is {depth} levels deep but there are only {num_heads} Medusa heads; "
                         f"each level needs one head")
    return paths


def _ranks(path) -> Path_:
    """A path as a tuple of int ranks; a rank that is not a whole number (0.5, "a", true) is refused, naming
    the path."""
    if isinstance(path, (list, tuple)) and not any(isinstance(r, bool) for r in path):
        try:
            return tuple(operator.index(r) for r in path)
        except TypeError:
            pass
    shown = list(path) if isinstance(path, tuple) else path
    raise ValueError(f"tree path {shown!r} is not a list of whole-number ranks")


ANY_DEVICE = "*"


def _parse(value) -> Tree:
    """A tree in JSON: a list of paths, or "dynamic:N"."""
    if isinstance(value, str):
        if not value.startswith(DYNAMIC) or not value[len(DYNAMIC):].isdigit():
            raise ValueError(f'a tree is a list of paths or "{DYNAMIC}N" (N nodes), not {value!r}')
        return DynamicTree(int(value[len(DYNAMIC):]))
    if not isinstance(value, list):
        raise ValueError(f'a tree is a list of paths or "{DYNAMIC}N" (N nodes), not a {type(value).__name__}')
    return validate_tree(value)


def trees_from_json(data) -> dict[str, Tree]:
    """A tree file's content -> {device type: tree}. Calibrated trees are saved per device type
    ({"devices": {"cpu": {"paths": [...], ...}}}): a tree that pays on a CPU is far too small for a GPU.
    A bare list of paths or {"paths": [...]} is one tree for every device (key ANY_DEVICE). "paths" may
    also be "dynamic:N" (a DynamicTree)."""
    if isinstance(data, list):
        return {ANY_DEVICE: _parse(data)}
    if not isinstance(data, dict) or not ("paths" in data or "devices" in data):
        raise ValueError('a tree file holds a list of paths, {"paths": [...]} or {"devices": {TYPE: {"paths": [...]}}}')
    out = {ANY_DEVICE: _parse(data["paths"])} if "paths" in data else {}
    for kind, entry in data.get("devices", {}).items():
        if not isinstance(entry, dict) or "paths" not in entry:
            raise ValueError(f'devices.{kind} has no "paths"')
        out[kind] = _parse(entry["paths"])
    return out


def default_tree(device_type: str) -> str:
    """The preset for heads with no tree calibrated for `device_type`: a small one on a CPU, the original
    Medusa's 64 nodes on an accelerator, where a step's extra nodes come almost free."""
    return CPU_TREE if device_type.split("-")[0] == "cpu" else DEFAULT_TREE


def tree_for_device(trees: dict[str, Tree], device_type: str) -> Tree | None:
    """The tree saved for this device type ("cpu", "cuda", ...; "cpu-int4" for 4-bit weights on a CPU, else the
    device's own), else the one for every device, else None."""
    return trees.get(device_type, trees.get(device_type.split("-")[0], trees.get(ANY_DEVICE)))


def load_tree(spec: str | os.PathLike | list | DynamicTree | None, num_heads: int | None = None,
              device_type: str | None = None) -> Tree:
    """A preset name, "dynamic:N", a JSON file (see `trees_from_json`: a per-device file gives `device_type`'s
    tree), a list of paths or a DynamicTree."""
    if spec is None:
        spec = DEFAULT_TREE
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str):
        if spec in PRESETS:
            paths = PRESETS[spec]
        elif spec.startswith(DYNAMIC) and not Path(spec).is_file():
            paths = _parse(spec)
        elif Path(spec).is_file():
            trees = read_tree_file(spec)
            paths = tree_for_device(trees, device_type) if device_type else trees.get(ANY_DEVICE)
            if paths is None:
                raise ValueError(f"tree file {spec} has no tree for {device_type or 'every device'} "
                                 f"(it has: {', '.join(sorted(trees))})")
        else:
            raise ValueError(f"unknown tree {spec!r}: not a preset ({', '.join(PRESETS)}), nor {DYNAMIC}N, "
                             f"nor a JSON file")
    else:
        paths = spec
    return validate_tree(paths, num_heads)


def read_tree_file(path: str | os.PathLike) -> dict[str, Tree]:
    """A tree file -> {device type: tree} (see `trees_from_json`); its errors name the file."""
    try:
        return trees_from_json(json.loads(Path(path).read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"tree file {path} is not valid JSON: {e}") from None
    except ValueError as e:
        raise ValueError(f"tree file {path}: {e}") from None


def trees_to_json(trees: dict[str, Tree]) -> dict:
    """The inverse of `trees_from_json`."""
    out = {"paths": tree_spec(trees[ANY_DEVICE])} if ANY_DEVICE in trees else {}
    devices = {k: {"paths": tree_spec(v)} for k, v in trees.items() if k != ANY_DEVICE}
    return out | ({"devices": devices} if devices else {})


def fit_tree_to_heads(paths: Tree, num_heads: int) -> Tree:
    """Drop nodes deeper than the number of heads (used when a preset meets fewer heads)."""
    if isinstance(paths, DynamicTree):
        return paths
    return [p for p in paths if len(p) <= num_heads]


@dataclass(frozen=True)
class TreeBuffers:
    """Everything the decode loop needs about a tree, as tensors. N nodes including the root."""
    paths: tuple[Path_, ...]     # node i > 0 is paths[i - 1]; sorted by depth, then lexicographically
    attn_mask: torch.Tensor      # (N, N) bool: node i sees node j (j is i or an ancestor of i)
    depth: torch.Tensor          # (N,) root = 0
    head: torch.Tensor           # (N,) which head proposes the node's token (depth - 1; root: 0, unused)
    rank: torch.Tensor           # (N,) top-k rank of the node's token in that head (root: 0, unused)
    parent: torch.Tensor         # (N,) parent's index (root: -1)
    retrieve: torch.Tensor       # (P, D + 1) node indices along each root-to-leaf path, -1 padded
    topk: int                    # largest rank used + 1
    children: tuple[tuple[int, ...], ...] = ()   # per node, its children in rank order
    drafted: int = 0             # the last `drafted` nodes are a chain of context drafts under the root
    # per depth d = 1..max_depth: (its nodes, the distinct parents of those, each node's parent's row among
    # them, how many ranks the level uses): for heads whose guesses follow their parent's token
    levels: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int], ...] = ()

    @property
    def num_nodes(self) -> int:
        return self.depth.numel()

    @property
    def head_nodes(self) -> int:
        """Nodes whose tokens come from the root and the heads (the rest are context drafts)."""
        return self.num_nodes - self.drafted

    @property
    def max_depth(self) -> int:
        """Depth of the deepest heads' node: how many heads the tree uses."""
        return max((len(p) for p in self.paths), default=0)

    def to(self, device) -> "TreeBuffers":
        move = {k: getattr(self, k).to(device) for k in ("attn_mask", "depth", "head", "rank", "parent", "retrieve")}
        levels = tuple((a.to(device), b.to(device), c.to(device), k) for a, b, c, k in self.levels)
        return TreeBuffers(paths=self.paths, topk=self.topk, children=self.children, drafted=self.drafted,
                           levels=levels, **move)


def tree_buffers(paths: list[Path_]) -> TreeBuffers:
    """Pure function: a tree's paths -> its buffers."""
    paths = sorted(validate_tree(paths), key=lambda p: (len(p), p))
    index = {(): 0} | {p: i + 1 for i, p in enumerate(paths)}
    n = len(paths) + 1
    attn = torch.zeros(n, n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.long)
    head = torch.zeros(n, dtype=torch.long)
    rank = torch.zeros(n, dtype=torch.long)
    parent = torch.full((n,), -1, dtype=torch.long)
    attn[0, 0] = True
    for p, i in index.items():
        if not p:
            continue
        depth[i], head[i], rank[i], parent[i] = len(p), len(p) - 1, p[-1], index[p[:-1]]
        for d in range(len(p) + 1):
            attn[i, index[p[:d]]] = True
    has_child = {p[:-1] for p in paths}
    leaves = [p for p in index if p not in has_child]
    max_depth = max((len(p) for p in paths), default=0)
    retrieve = torch.full((len(leaves), max_depth + 1), -1, dtype=torch.long)
    for row, leaf in enumerate(leaves):
        for d in range(len(leaf) + 1):
            retrieve[row, d] = index[leaf[:d]]
    topk = max((r for p in paths for r in p), default=-1) + 1
    children = tuple(tuple(j for j in range(1, n) if parent[j] == i) for i in range(n))
    levels = []
    for d in range(1, max_depth + 1):
        nodes = [i for i in range(1, n) if depth[i] == d]
        parents = sorted({int(parent[i]) for i in nodes})
        rows = [parents.index(int(parent[i])) for i in nodes]
        levels.append((torch.tensor(nodes), torch.tensor(parents), torch.tensor(rows), int(rank[nodes].max()) + 1))
    return TreeBuffers(tuple(paths), attn, depth, head, rank, parent, retrieve, topk, children, levels=tuple(levels))


def with_drafts(tree: TreeBuffers, n: int) -> TreeBuffers:
    """Pure function: the tree plus a chain of `n` nodes under the root, for tokens drafted from the context
    (see lookup.py). The chain is one more root-to-leaf path; its nodes come after the heads' nodes and are
    the root's last children, so rank-ordered schemes try the heads' guesses first."""
    if n < 0 or tree.drafted:
        raise ValueError(f"with_drafts takes a heads-only tree and n >= 0 (got n={n}, drafted={tree.drafted})")
    if n == 0:
        return tree
    base, total = tree.num_nodes, tree.num_nodes + n
    chain = torch.arange(base, total)
    attn = torch.zeros(total, total, dtype=torch.bool)
    attn[:base, :base] = tree.attn_mask
    attn[base:, 0] = True
    attn[base:, base:] = torch.ones(n, n, dtype=torch.bool).tril()
    depth = torch.cat([tree.depth, torch.arange(1, n + 1)])
    zeros = torch.zeros(n, dtype=torch.long)
    parent = torch.cat([tree.parent, torch.cat([torch.zeros(1, dtype=torch.long), chain[:-1]])])
    width = max(tree.retrieve.shape[1], n + 1)
    retrieve = torch.full((tree.retrieve.shape[0] + 1, width), -1, dtype=torch.long)
    retrieve[:-1, : tree.retrieve.shape[1]] = tree.retrieve
    retrieve[-1, 0], retrieve[-1, 1:n + 1] = 0, chain
    children = list(tree.children) + [(int(j) + 1,) for j in chain[:-1]] + [()]
    children[0] = children[0] + (base,)
    return TreeBuffers(tree.paths, attn, depth, torch.cat([tree.head, zeros]), torch.cat([tree.rank, zeros]),
                       parent, retrieve, tree.topk, tuple(children), drafted=n, levels=tree.levels)
