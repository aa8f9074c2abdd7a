"""The shared evaluation harness: synthetic long-context tasks, a runner, tables and plots.

    from llmsys.eval import NeedleTask, evaluate, format_table, plot_heatmap
    result = evaluate(model, NeedleTask(), method=None, lengths=[1024, 2048], samples=10)
    print(format_table(result)); plot_heatmap(result, "needle.png")

See docs/eval.md.
"""

from llmsys.eval.plots import plot_budget, plot_heatmap
from llmsys.eval.runner import (
    DEFAULT_DEPTHS,
    DEFAULT_LENGTHS,
    Method,
    accuracy_grid,
    as_method,
    cache_method,
    context_method,
    evaluate,
    format_markdown,
    format_table,
    full,
    generate_method,
    greedy_decode,
    kv_bytes,
)
from llmsys.eval.tasks import (
    REFERENCE_VOCAB,
    TASKS,
    MQARTask,
    NeedleTask,
    Sample,
    SyntheticVocab,
    VariableTrackingTask,
    exact_match,
    get_task,
    make_samples,
    synthetic_tokenizer,
)

__all__ = [
    "DEFAULT_DEPTHS",
    "DEFAULT_LENGTHS",
    "REFERENCE_VOCAB",
    "TASKS",
    "MQARTask",
    "Method",
    "NeedleTask",
    "Sample",
    "SyntheticVocab",
    "VariableTrackingTask",
    "accuracy_grid",
    "as_method",
    "cache_method",
    "context_method",
    "evaluate",
    "exact_match",
    "format_markdown",
    "format_table",
    "full",
    "generate_method",
    "get_task",
    "greedy_decode",
    "kv_bytes",
    "make_samples",
    "plot_budget",
    "plot_heatmap",
    "synthetic_tokenizer",
]
