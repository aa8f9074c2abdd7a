"""Every way a thread can end is a clear, recorded outcome with the tree so far; bad input raises."""

from __future__ import annotations

import json
import time

import pytest
import torch
from pydantic import BaseModel

from llmsys.models import UnsupportedModelError
from llmsys.testing import local_tokenizer, tiny_model
from llmsys.threads import Outcome, Sampling, ScriptedPolicy, ThreadRunner, Tool
from llmsys.threads.synthetic import calculator

HEAD = '{"reasoning":[{"thought":"add","tooluse":{"tool_name":'


@pytest.fixture(scope="module")
def tok():
    return local_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def runner(model, tok, **kw):
    kw.setdefault("system", "")
    kw.setdefault("tools", {"calc": calculator})
    return ThreadRunner(model, tok, **kw)


def script(tok, *pieces):
    return ScriptedPolicy.from_text(tok, *pieces)


def test_answer_with_a_tool_call(model, tok):
    r = runner(model, tok).run(
        "q", script(tok, HEAD + '"calc","parameters":{"expression":"6*7"}', '},"conclusion":"42"}],"answer":"42"}')
    )
    assert r.outcome is Outcome.ANSWERED and r.ok and r.answer == "42" and r.message is None
    assert r.tree["reasoning"][0]["tooluse"]["tool_result"] == {"value": 42}
    assert json.loads(r.text) == r.tree
    (call,) = r.tool_calls
    assert call.ok and call.name == "calc" and call.parameters == {"expression": "6*7"} and call.task == (0,)
    assert r.token_kinds.count("tool") == r.stats.tokens_injected > 0
    assert r.to_dict()["tool_calls"][0]["result"] == {"value": 42}


def test_malformed_json_without_grammar(model, tok):
    r = runner(model, tok, grammar=False).run("q", script(tok, '{"reasoning":[{"thought":"ab",}'))
    assert r.outcome is Outcome.MALFORMED and "expected a key string" in r.message
    assert r.tree == {"reasoning": [{"thought": "ab"}]} and r.answer is None
    r = runner(model, tok, grammar=False).run("q", script(tok, '{"reasoning":[],"answr":"x"}'))
    assert r.outcome is Outcome.MALFORMED and "not a Response" in r.message


def test_the_grammar_refuses_a_forced_token(model, tok):
    r = runner(model, tok).run("q", script(tok, '{"reasoning":[{"thought":"ab",}'))
    assert r.outcome is Outcome.GRAMMAR_REJECTED and "does not continue the schema" in r.message
    assert r.tree == {"reasoning": [{"thought": "ab"}]}
    r = runner(model, tok).run("q", script(tok, HEAD + '"nope"'))
    assert r.outcome is Outcome.GRAMMAR_REJECTED and r.tool_calls == []


def test_truncated_and_stopped(model, tok):
    text = '{"reasoning":[{"thought":"a long thought that goes on","conclusion":"c"}],"answer":"a"}'
    r = runner(model, tok, max_new_tokens=16).run("q", script(tok, text))
    assert r.outcome is Outcome.TRUNCATED and "max_new_tokens=16" in r.message
    assert r.stats.tokens_generated == 16
    assert r.tree["reasoning"][0]["thought"].startswith("a")  # the open string is in the tree
    r = runner(model, tok).run("q", script(tok, text[:30]))
    assert r.outcome is Outcome.STOPPED and r.tree["reasoning"][0]["thought"] == text[26:30]
    assert "stopped before the JSON was complete" in r.message


def test_unknown_tool_without_grammar_is_an_error_result(model, tok):
    r = runner(model, tok, grammar=False).run(
        "q", script(tok, HEAD + '"nope","parameters":{}', '},"conclusion":"c"}],"answer":"a"}')
    )
    assert r.outcome is Outcome.ANSWERED
    (call,) = r.tool_calls
    assert not call.ok and "unknown tool 'nope'" in call.error and "calc" in call.error
    assert r.tree["reasoning"][0]["tooluse"]["tool_result"] == {"error": call.error}


class Div(BaseModel):
    a: int
    b: int


def divide(args: Div) -> float:
    return args.a / args.b


def slow(seconds: float) -> str:
    time.sleep(seconds)
    return "late"


def test_raising_invalid_and_slow_tools_become_error_results(model, tok):
    tools = {"div": Tool(divide, parameters=Div), "slow": slow}
    run = runner(model, tok, tools=tools, tool_timeout=0.3)
    tail = '},"conclusion":"c"}],"answer":"a"}'
    r = run.run("q", script(tok, HEAD + '"div","parameters":{"a":1,"b":0}', tail))
    assert r.ok and r.tool_calls[0].error == "ZeroDivisionError: division by zero"
    r = run.run("q", script(tok, HEAD + '"slow","parameters":{"seconds":5}', tail))
    assert r.ok and "timed out after 0.3 s" in r.tool_calls[0].error and r.tool_calls[0].seconds < 2
    # parameters the pydantic model refuses (no grammar: the model may write anything)
    r = runner(model, tok, tools=tools, grammar=False).run(
        "q", script(tok, HEAD + '"div","parameters":{"a":"x"}', tail)
    )
    assert r.ok and r.tool_calls[0].error.startswith("ValidationError")


def test_a_token_running_past_the_parameters_is_cut(model, tok):
    # without the grammar, parameters may be a string: the token '"}' closes it and runs one byte past
    end_quote = tok.convert_tokens_to_ids('"}')
    head = tok.encode(HEAD + '"echo","parameters":"hi', add_special_tokens=False)
    tail = tok.encode('},"conclusion":"c"}],"answer":"a"}', add_special_tokens=False)
    policy = ScriptedPolicy([*head, end_quote, *tail])
    r = runner(model, tok, tools={"echo": lambda text: text.upper()}, grammar=False).run("q", policy)
    assert r.ok and r.tool_calls[0].result == "HI"
    assert r.tree["reasoning"][0]["tooluse"] == {"tool_name": "echo", "parameters": "hi", "tool_result": "HI"}
    cut = r.stats.prompt_tokens + len(head)  # where the '"}' token was chosen
    assert r.token_ids[cut] == tok.convert_tokens_to_ids('"') and r.token_kinds[cut + 1] == "tool"
    assert end_quote not in r.token_ids[cut : cut + 5]


def test_sampling_runs_end_in_a_recorded_outcome(model, tok):
    results = runner(model, tok, max_new_tokens=40, sampling=Sampling(temperature=1.0, top_p=0.9, seed=3)).run_batch(
        ["a", "b"]
    )
    for r in results:
        assert r.outcome in (Outcome.ANSWERED, Outcome.TRUNCATED) and r.stats.tokens_generated <= 40
        assert r.text.startswith("{")


def test_bad_arguments_name_the_fix(model, tok):
    with pytest.raises(ValueError, match="pruning_buffer"):
        runner(model, tok, pruning_buffer=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        runner(model, tok, max_new_tokens=0)
    with pytest.raises(ValueError, match="tool_timeout"):
        runner(model, tok, tool_timeout=0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)
    with pytest.raises(ValueError, match="one per question"):
        runner(model, tok).run_batch(["a", "b"], [ScriptedPolicy([])])
    with pytest.raises(ValueError, match="tokenizer that belongs to this model"):
        runner(tiny_model("llama", vocab_size=300), tok)
    with pytest.raises(UnsupportedModelError, match="dense"):
        runner(tiny_model("mixtral"), tok)


def test_greedy_and_top_p_choices():
    logits = torch.tensor([0.0, 3.0, 1.0, float("-inf")])
    assert Sampling().choose(logits) == 1
    assert Sampling(temperature=1.0, top_p=1e-6, seed=0).choose(logits) == 1  # the nucleus is the top token
    draws = {Sampling(temperature=5.0, seed=s).choose(logits) for s in range(30)}
    assert draws <= {0, 1, 2} and len(draws) > 1  # never a forbidden (-inf) token
