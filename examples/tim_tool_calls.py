"""TIM/TIMRUN in a notebook: a reasoning tree with tool calls, subtask pruning and its statistics.

A tiny random-weight model cannot reason, so a `ScriptedPolicy` forces the tokens of a tree written
by hand; everything else is the real runtime: the model runs at every step, the grammar checks
every token, the tracker follows the tree, the calculator is called when a ``parameters`` value
closes (its result is written into the KV cache), and finished subtask lists are pruned.
With a real TIM model, drop the policy: ``runner.run(question)`` decodes greedily.

    .venv/bin/python examples/tim_tool_calls.py
"""

from __future__ import annotations

import torch

from llmsys.testing import local_tokenizer, tiny_model
from llmsys.threads import ScriptedPolicy, ThreadRunner, format_tree
from llmsys.threads.synthetic import calculator


def task(thought: str, conclusion: str, expression: str | None = None, subtasks: list | None = None) -> dict:
    node: dict = {"thought": thought}
    if expression:
        node["tooluse"] = {"tool_name": "calc", "parameters": {"expression": expression}}
    if subtasks:
        node["subtasks"] = subtasks
    node["conclusion"] = conclusion
    return node


TREE = {
    "reasoning": [
        task(
            "Compute the total cost of 17 boxes at 23 each plus 4 shipping, then the share of 5 people.",
            "The total is 395 and each person pays 79.",
            subtasks=[
                task(
                    "First the cost of the boxes.",
                    "The boxes cost 391.",
                    subtasks=[task("Multiply count by price.", "17 boxes cost 391.", "17*23")],
                ),
                task("Add the shipping.", "With shipping the total is 395.", "391+4"),
                task("Split between 5 people.", "Each pays 79.", "395/5"),
            ],
        ),
        task("Check: is the share more than 80?", "79 is less than 80.", "79-80"),
    ],
    "answer": "Each person pays 79, which is less than 80.",
}


def main() -> None:
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    tokenizer = local_tokenizer()
    model = tiny_model("qwen3")  # any supported dense family; TIM-8b is a Qwen3
    question = "17 boxes cost 23 each plus 4 shipping. Split between 5 people: more than 80 each?"
    for buffer in (None, 0, 1):
        runner = ThreadRunner(model, tokenizer, tools={"calc": calculator}, pruning_buffer=buffer)
        result = runner.run(question, policy=ScriptedPolicy.from_tree(tokenizer, TREE))
        s = result.stats
        label = "no pruning" if buffer is None else f"pruning buffer {buffer}"
        print(f"=== {label}: {result.outcome.value}, answer: {result.answer!r}")
        if buffer == 0:
            print(format_tree(result.tree, result.pruned_tasks()))
            for call in result.tool_calls:
                where = f"task {call.task}, {call.seconds * 1e3:.1f} ms"
                print(f"  tool {call.name}({call.parameters}) -> {call.result}  [{where}]")
        print(
            f"  prompt {s.prompt_tokens} + generated {s.tokens_generated} + tool results {s.tokens_injected} tokens; "
            f"{s.prunes} prunes removed {s.tokens_pruned} ({s.pruned_share:.0%} of the KV), "
            f"{s.tokens_reencoded} re-encoded"
        )
        print(
            f"  largest position {s.max_position}, peak working memory {s.peak_working_memory} tokens, "
            f"peak KV {s.kv_peak_bytes / 1024:.0f} KiB (without pruning {s.kv_unpruned_bytes / 1024:.0f} KiB)"
        )
        print("  working memory over time (tokens generated, tokens):", s.working_memory[:8], "...")


if __name__ == "__main__":
    main()
