"""A model without a chat template (a base model's GGUF) behaves alike in every command: one notice when it
loads, then plain text; `--chat-template FILE` gives it a template instead."""
from __future__ import annotations

import io
import json

import pytest
import torch

from conftest import CHAT_TEMPLATE, random_heads, tiny_model, tiny_tokenizer
from medusa.chat_format import encode_prompt, plain_text, prompt_ids, render
from medusa.inference.checkpoint import save_heads
from medusa.interfaces.cli import main
from medusa.training.data import tokenize_conversation
from medusa.training.distill import DistillConfig, run_distill
from medusa.training.trainer import TrainConfig, train

NOTICE = "has no chat template: prompts go in as plain text"
CONVERSATION = [{"role": "user", "content": "say 3"}, {"role": "assistant", "content": " 3 3"},
                {"role": "user", "content": "and 4"}]


def bare_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = None
    return tok


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny base whose tokenizer has no chat template, heads naming it, a template file, and data."""
    root = tmp_path_factory.mktemp("bare")
    tiny_model("llama").save_pretrained(root / "base")
    bare_tokenizer().save_pretrained(root / "base")
    heads = random_heads(num_heads=3)
    heads.config.base_model_name_or_path = str(root / "base")
    save_heads(root / "heads", heads)
    (root / "chatml.jinja").write_text(CHAT_TEMPLATE)
    with open(root / "prompts.jsonl", "w") as f:
        for k in range(12):
            f.write(json.dumps({"id": f"p{k}", "category": "c", "prompt": f"say {k} and {k * 7}"}) + "\n")
    with open(root / "data.jsonl", "w") as f:
        for k in range(3):
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"say {k}"},
                                                  {"from": "gpt", "value": f" {k} {k} {k}"}]}) + "\n")
    return root


def test_plain_text_is_a_message_as_it_is_and_a_conversation_in_order():
    tok = bare_tokenizer()
    assert plain_text(CONVERSATION[:1]) == "say 3"
    assert plain_text(CONVERSATION) == "say 3 3 3\n\nand 4"        # an answer follows its question directly
    for n in range(1, len(CONVERSATION) + 1):                         # each turn extends the text before it
        assert render(tok, CONVERSATION).startswith(render(tok, CONVERSATION[:n]))
    assert encode_prompt(tok, CONVERSATION).tolist() == [tok(plain_text(CONVERSATION))["input_ids"]]
    assert encode_prompt(tok, CONVERSATION, chat=False).tolist() == [tok("and 4")["input_ids"]]
    templated = tiny_tokenizer()
    assert prompt_ids(templated, CONVERSATION) == encode_prompt(templated, CONVERSATION)[0].tolist()


def test_training_data_without_a_template_marks_the_answer_in_plain_text():
    tok = bare_tokenizer()
    ex = tokenize_conversation(tok, CONVERSATION[:2], 512)
    assert tok.decode(ex.input_ids[ex.loss_mask]) == " 3 3"
    assert tok.decode(ex.input_ids) == "say 3 3 3"


def _reference(model, tok, prompt: str, n: int) -> str:
    """`generate`'s greedy answer to one prompt encoded as `encode_prompt` does."""
    ids = encode_prompt(tok, [{"role": "user", "content": prompt}])
    eos = [model.config.eos_token_id, tok.eos_token_id]
    new = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=eos)[0, ids.shape[1]:]
    return tok.decode([t for t in new.tolist() if t not in eos], skip_special_tokens=True)


@pytest.mark.parametrize("template", [None, "chatml.jinja"])
def test_distill_then_train_a_model_without_a_template(folders, tmp_path, template):
    """Distill answers as `generate` does on the same prompt (plain text, or the template given), says once
    that the model has no template when none is given, and train takes the rows it wrote."""
    logs = []
    cfg = DistillConfig(inputs=[str(folders / "prompts.jsonl")], output=str(tmp_path / "out.jsonl"),
                        model=str(folders / "base"), max_new_tokens=10, batch_size=4, pack_weights=False,
                        chat_template=template and str(folders / template))
    run_distill(cfg, log=logs.append)
    assert sum(NOTICE in m for m in logs) == (template is None)
    rows = [json.loads(x) for x in open(cfg.output)]
    assert len(rows) == 12
    tok = bare_tokenizer()
    if template:
        tok.chat_template = CHAT_TEMPLATE
    model = tiny_model("llama")
    for row in rows[:4]:
        human, answer = row["conversations"]
        assert answer["value"] == _reference(model, tok, human["value"], 10)
    logs = []
    out = tmp_path / "heads"
    res = train(TrainConfig(data=cfg.output, output=str(out), num_heads=2, batch_size=4, epochs=1, val_examples=2,
                            chat_template=cfg.chat_template), base=tiny_model("llama"), tokenizer=bare_tokenizer(),
                log=logs.append)
    assert res["finished"] and sum(NOTICE in m for m in logs) == (template is None)


def _run(command: str, folders, tmp_path, *extra: str) -> str:
    """`medusa COMMAND` on the template-less model, as a user runs it; -> stderr."""
    args = {
        "generate": ["--prompt", "say 3", "--max-new-tokens", "3"],
        "chat": ["--max-new-tokens", "3"],
        "serve": [],
        "evaluate": ["--data", str(folders / "data.jsonl")],
        "calibrate": ["--data", str(folders / "data.jsonl"), "--budgets", "1,3", "--rounds", "1", "--no-dynamic",
                      "--save-to", str(tmp_path)],
        "bench": ["--questions", str(folders / "prompts.jsonl"), "--limit", "1", "--max-new-tokens", "3",
                  "--no-prompt-lookup", "--no-plain", "--no-warmup", "--output", str(tmp_path / "bench")],
    }[command]
    model = ["--model", str(folders / "heads")] + (["--base-model", str(folders / "base")] if command == "evaluate"
                                                    else [])
    assert main([command, *model, *args, *extra]) == 0
    return command


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "evaluate", "calibrate", "bench"])
def test_every_command_says_once_that_the_model_has_no_template(folders, tmp_path, capsys, monkeypatch, command):
    import medusa.interfaces.server

    served = []
    monkeypatch.setattr(medusa.interfaces.server, "serve", lambda model, **kw: served.append(model))
    monkeypatch.setattr("sys.stdin", io.StringIO("say 3\nand 4\n"))       # chat: two turns, then EOF
    _run(command, folders, tmp_path)
    err = capsys.readouterr().err
    assert err.count(NOTICE) == 1 and "Traceback" not in err, err
    if command == "serve":      # the server's rule stays: without a template, one message per chat request
        assert served[0].tokenizer.chat_template is None


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_a_chat_template_file_is_set_on_the_tokenizer(folders, tmp_path, capsys, monkeypatch, command):
    import medusa.interfaces.server

    served = []
    monkeypatch.setattr(medusa.interfaces.server, "serve", lambda model, **kw: served.append(model))
    _run(command, folders, tmp_path, "--chat-template", str(folders / "chatml.jinja"))
    assert NOTICE not in capsys.readouterr().err
    if served:
        assert served[0].tokenizer.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("content, says", [
    (None, "chat template {path}: cannot read it"),
    ("  \n", "chat template {path} is empty"),
    ("{{ raise_exception('no users here') }}", "chat template {path} does not render a user message: no users here"),
    ("{% for m in messages %}", "chat template {path} does not render a user message"),
], ids=["missing", "empty", "raises", "syntax"])
def test_a_bad_chat_template_file_is_refused_naming_it(folders, tmp_path, capsys, content, says):
    path = tmp_path / "t.jinja"
    if content is not None:
        path.write_text(content)
    assert main(["generate", "--model", str(folders / "heads"), "--prompt", "hi", "--chat-template", str(path)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("medusa generate: error: ") and says.format(path=path) in last, err
    assert ("Loading" in err) == (content not in (None, "  \n"))     # a file that cannot be read: before loading


def test_every_command_that_encodes_prompts_takes_chat_template():
    from medusa.interfaces.cli import build_cli

    parser, _ = build_cli()
    need = {"distill": ["--input", "p", "--output", "o"], "train": ["--data", "d", "--output", "o"],
            "generate": ["--prompt", "p"], "bench": ["--questions", "q"]}
    for command in ["chat", "generate", "serve", "distill", "train", "evaluate", "calibrate", "bench"]:
        a = parser.parse_args([command, *need.get(command, []), "--chat-template", "t.jinja"])
        assert a.chat_template == "t.jinja", command


def test_eos_ids_are_the_callers_else_the_models_and_the_tokenizers():
    from medusa import MedusaModel
    from medusa.chat_format import eos_token_ids

    model, tok = tiny_model("llama"), tiny_tokenizer()           # no EOS in the generation config
    assert eos_token_ids(model, tok) == (tok.eos_token_id,) and eos_token_ids(model) == ()
    model.generation_config.eos_token_id = [5, tok.eos_token_id]
    assert eos_token_ids(model, tok) == (5, tok.eos_token_id)    # each once, the model's first
    model.generation_config.eos_token_id = 7
    assert eos_token_ids(model, tok) == (7, tok.eos_token_id)
    assert eos_token_ids(model, tok, 9) == (9,) and eos_token_ids(model, tok, []) == ()
    m = MedusaModel(model, random_heads(), tok)
    assert m.decode_options().eos_token_ids == (7, tok.eos_token_id)   # decoding and distill share it
    assert m.decode_options(eos_token_id=[3, 4]).eos_token_ids == (3, 4)
