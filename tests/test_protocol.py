"""The message protocol has one home: server/protocol.py names every key both apps use."""

import ast
from pathlib import Path

from server import protocol

ROOT = Path(__file__).resolve().parent.parent
KEYS = sorted({v for k, v in vars(protocol).items() if k.isupper() and isinstance(v, str) and k not in ("START_STATE",)})


RECORDS = ("RecordDict", "ConfigRecord", "MetricRecord", "ArrayRecord")


def key_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every string that names a key: a subscript, a `.get` or `in` test, a record's dict key,
    and any string in code (not a docstring) that holds `key=` (a --node-config)."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        used = []
        if isinstance(node, ast.Subscript):
            used.append(node.slice)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args:
            used.append(node.args[0])
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            used.append(node.left)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in RECORDS and node.args \
                and isinstance(node.args[0], ast.Dict):
            used.extend(k for k in node.args[0].keys if k is not None)
        found += [(n.lineno, n.value) for n in used if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found += [(node.lineno, f"{key}=") for key in KEYS if f"{key}=" in node.value]
    return found


def test_no_message_key_is_written_as_a_string_literal_outside_the_protocol():
    assert {"partition-id", "num-examples", "unknown-tasks", "gate", "tasks", "arrays"} <= set(KEYS)  # what it checks
    found = []
    for path in sorted([*ROOT.glob("server/*.py"), *ROOT.glob("client/*.py"), *ROOT.glob("deploy/*.py")]):
        if path.name == "protocol.py":
            continue
        for line, text in key_literals(ast.parse(path.read_text())):
            if text in KEYS or text.removesuffix("=") in KEYS and text.endswith("="):
                found.append(f"{path.relative_to(ROOT)}:{line}: {text}")
    assert not found, "message keys written out instead of taken from server/protocol.py:\n" + "\n".join(found)


def test_the_key_check_finds_what_it_looks_for():
    code = ast.parse(
        'msg.content["config"]["tasks"]\nm.get("gate")\nif "data-file" in c: pass\nRecordDict({"metrics": x})\n'
        'text = f"partition-id={i}"\n{"metrics": 1}\nwhat = "gate"\n'
    )
    assert sorted(key_literals(code)) == [(1, "config"), (1, "tasks"), (2, "gate"), (3, "data-file"), (4, "metrics"), (5, "partition-id=")]


def test_a_node_report_survives_the_wire(server_identity):
    from flwr.app import Message, RecordDict

    report = protocol.NodeReport(3, 100, 41, 4, (10, 0, 31), False, "f" * 32, {"poetry": 2})
    asked = Message(RecordDict({protocol.CONFIG: protocol.run_config(["a", "b", "c"], "0" * 32)}), dst_node_id=7, message_type="query")
    assert protocol.run_tasks_of(asked) == ("a", "b", "c") and protocol.input_prompts_sha_of(asked) == "0" * 32
    reply = protocol.report_reply(Message(asked.content, dst_node_id=7, message_type="query"), report)
    assert protocol.parse_report(reply.content) == report
    plain = protocol.report_reply(Message(asked.content, dst_node_id=7, message_type="query"),
                                  protocol.NodeReport(-1, 0, 5, 0, (5,), True, "e" * 32))
    assert protocol.parse_report(plain.content).unknown_tasks == {}
