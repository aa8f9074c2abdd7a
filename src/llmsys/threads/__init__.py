"""TIM / TIMRUN: reasoning trees with subtask KV pruning and tool calls inside one inference.

- `ThreadRunner` - the runtime (registered as method ``"timrun"``): grammar-constrained decoding
  of the Task/Response tree, subtask pruning with re-encoding of the kept tail, in-loop tool calls,
  several threads per batch; returns `ThreadResult` (tree, answer, `Outcome`, `ThreadStats`).
- `Tool`, `response_schema`, `system_prompt` - the output format, extensible with tool schemas.
- `Sampling` (greedy / temperature / top-p) and `ScriptedPolicy` (forced tokens) - who picks tokens.
- `TreeTracker` - the incremental JSON parser that knows which task and field each byte is in.
- `BatchKV` - working memory on the llmsys `PagedCache`.
- `synthetic_tree` / `format_tree` - scripted trees for tests and benchmarks, a readable printout.

See docs/threads.md.
"""

from llmsys.threads.errors import GrammarUnavailableError, ScriptError, ThreadsError, ToolSpecError
from llmsys.threads.memory import BatchKV, rebase, truncate
from llmsys.threads.policies import Sampling, ScriptedPolicy, TokenPolicy, script_pieces, scripted_policies
from llmsys.threads.runtime import Outcome, StepView, Thread, ThreadResult, ThreadRunner, ThreadStats
from llmsys.threads.schema import Tool, normalize_tools, response_schema, system_prompt
from llmsys.threads.synthetic import format_tree, synthetic_tree
from llmsys.threads.tools import ToolCall
from llmsys.threads.tracker import Done, ListClosed, ParamsClosed, TreeTracker

__all__ = [
    "BatchKV",
    "Done",
    "GrammarUnavailableError",
    "ListClosed",
    "Outcome",
    "ParamsClosed",
    "Sampling",
    "ScriptError",
    "ScriptedPolicy",
    "StepView",
    "Thread",
    "ThreadResult",
    "ThreadRunner",
    "ThreadStats",
    "ThreadsError",
    "TokenPolicy",
    "Tool",
    "ToolCall",
    "ToolSpecError",
    "TreeTracker",
    "format_tree",
    "normalize_tools",
    "rebase",
    "response_schema",
    "script_pieces",
    "scripted_policies",
    "synthetic_tree",
    "system_prompt",
    "truncate",
]
