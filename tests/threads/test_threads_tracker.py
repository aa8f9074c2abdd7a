"""The incremental JSON tree tracker: same tree as json.loads under any chunking, the right events."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from llmsys.threads import Done, ListClosed, ParamsClosed, TreeTracker
from llmsys.threads.policies import script_pieces
from llmsys.threads.synthetic import synthetic_tree

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


def feed_all(tracker: TreeTracker, data: bytes, cuts: list[int]) -> list:
    events, pos = [], 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        while pos < cut:
            consumed, evs = tracker.feed(data[pos:cut])
            events += evs
            pos += consumed
            if tracker.done or tracker.error:
                return events
    return events


@settings(max_examples=150, deadline=None)
@given(
    value=st.dictionaries(st.text(max_size=5), json_values, max_size=5),
    cuts=st.lists(st.integers(0, 10**4)),
    indent=st.sampled_from([None, 1]),
    ascii_only=st.booleans(),
)
def test_tree_equals_json_loads_under_any_chunking(value, cuts, indent, ascii_only):
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only, separators=None if indent else (",", ":"))
    data = text.encode("utf-8")
    tracker = TreeTracker()
    events = feed_all(tracker, data, cuts)
    assert tracker.error is None
    assert tracker.done and tracker.pos == len(data)
    assert tracker.tree() == json.loads(text)
    assert events[-1] == Done(len(data))


def test_events_of_a_reasoning_tree():
    tree = synthetic_tree(depth=3, branching=2, top_tasks=2, tool_every=2)
    pieces = script_pieces(tree)
    tracker = TreeTracker()
    seen: list = []
    text = b""
    for i, piece in enumerate(pieces):
        data = piece.encode()
        consumed, events = tracker.feed(data)
        assert consumed == len(data) and tracker.error is None
        text += data
        seen += events
        if i < len(pieces) - 1:
            assert isinstance(events[-1], ParamsClosed)  # every piece ends at a tool call
            inject = b',"tool_result":{"value":1}'
            assert tracker.feed(inject) == (len(inject), [])
            text += inject
    lists = [e for e in seen if isinstance(e, ListClosed)]
    assert len(lists) == 2 * 3  # every task above the last level owns one subtasks list
    for e in lists:
        assert text[e.open : e.open + 1] == b"[" and text[e.close : e.close + 1] == b"]"
        assert text[: e.open].endswith(b'"subtasks":')
    # the innermost lists close first; the owner of a list is its task's path
    assert lists[0].task == (0, 0) and lists[2].task == (0,)
    params = [e for e in seen if isinstance(e, ParamsClosed)]
    assert [p.tool_name for p in params] == ["calc"] * len(params) and len(params) == len(pieces) - 1
    assert all(isinstance(p.parameters, dict) and "expression" in p.parameters for p in params)
    assert isinstance(seen[-1], Done) and tracker.done
    expected = json.loads(text)
    assert tracker.tree() == expected
    assert expected["reasoning"][0]["subtasks"][0]["thought"] == tree["reasoning"][0]["subtasks"][0]["thought"]


def test_feed_stops_right_after_parameters_and_root():
    tracker = TreeTracker()
    head = b'{"reasoning":[{"thought":"t","tooluse":{"tool_name":"f","parameters":{"a":1}'
    consumed, events = tracker.feed(head + b',"tool_result":5}')
    assert consumed == len(head) and isinstance(events[-1], ParamsClosed)
    assert events[-1].parameters == {"a": 1} and events[-1].task == (0,)
    # a scalar parameters value ends at the next byte, which stays unread
    tracker = TreeTracker()
    head = b'{"reasoning":[{"thought":"t","tooluse":{"tool_name":"f","parameters":12'
    consumed, events = tracker.feed(head + b"}")
    assert consumed == len(head) and events[-1].parameters == 12
    tracker = TreeTracker()
    assert tracker.feed(b'{"answer":"x"} trailing')[0] == len(b'{"answer":"x"}') and tracker.done


def test_lists_outside_tasks_are_not_subtask_lists():
    tracker = TreeTracker()
    text = b'{"reasoning":[{"thought":"t","tooluse":{"tool_name":"f","parameters":{"subtasks":[1]}'
    _, events = tracker.feed(text)
    assert not any(isinstance(e, ListClosed) for e in events)
    tracker = TreeTracker()
    _, events = tracker.feed(b'{"subtasks":[{"thought":"x","subtasks":[]}],"answer":"a"}')
    assert not any(isinstance(e, ListClosed) for e in events)  # no "reasoning" above: not a Response


def test_errors_and_partial_trees():
    tracker = TreeTracker()
    consumed, _ = tracker.feed(b'{"reasoning":[{"thought":"ab",}')
    assert tracker.error is not None and "expected a key string" in tracker.error
    assert consumed == len(b'{"reasoning":[{"thought":"ab",')
    assert tracker.tree() == {"reasoning": [{"thought": "ab"}]}
    assert tracker.feed(b"more") == (0, [])  # nothing is read after an error

    tracker = TreeTracker()
    tracker.feed(b'{"reasoning":[{"thought":"half a thou')
    assert tracker.tree() == {"reasoning": [{"thought": "half a thou"}]}
    assert tracker.location() == ((0,), "thought")
    tracker.feed(b'ght","subtasks":[{"thought":"')
    assert tracker.location() == ((0, 0), "thought")
    assert TreeTracker().feed(b'{"a":tru}')[0] == len(b'{"a":tru')
    bad = TreeTracker()
    bad.feed(b'{"a":"\\q"}')
    assert bad.error is not None and "escape" in bad.error
