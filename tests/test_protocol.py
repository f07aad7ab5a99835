"""One definition of the host-agent protocol: the host's constants are the agent's own objects (imported from
device_agents, never copied), the result schema agrees with the agent, and importing the agent on the host loads
nothing but the standard library. Costs ~1 s (one subprocess)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from device_agents import agent, helper
from pipeline import inventory, results
from pipeline.convert import edgetpu, source
from pipeline.devices import probe, push
from pipeline.run import plan

ROOT = Path(__file__).resolve().parent.parent


def test_the_hosts_protocol_constants_are_the_agents_own():
    assert plan.RUNTIME_ORDER is agent.RUNTIME_ORDER                      # run.effective_runtime's auto order
    assert inventory.RUNTIMES == ("auto",) + agent.RUNTIME_ORDER                # targets.yaml `runtime:` values
    assert source.EDGETPU_OP is agent.EDGETPU_CUSTOM_OP                   # identify: an Edge-TPU-compiled .tflite
    assert edgetpu.CUSTOM_OP is agent.EDGETPU_CUSTOM_OP                   # the compiled graph's mapped segments
    assert results.accelerator_of is agent.accelerator_of                 # edgetpu | gpu | cpu of a delegate
    assert push.EXEC_MISSING is helper.EXEC_MISSING                        # the helper's "push first" exit code
    assert probe.RUNTIME_KEYS == {m: n for n, m in agent.RUNTIME_MODULES.items()}
    assert push.DEVICE_HELPER == (ROOT / "device_agents" / "helper.py").read_text()


def test_the_result_schema_agrees_with_the_agent():
    schema = json.loads(results.SCHEMA_PATH.read_text())
    assert schema["properties"]["schema_version"]["const"] == agent.SCHEMA_VERSION
    runtime = schema["$defs"]["measurement"]["properties"]["runtime"]["properties"]["name"]["enum"]
    assert set(runtime) == set(agent.RUNTIME_ORDER)
    failure = agent.envelope(False, error={"code": "bad_args", "message": "m"})
    results.validate_agent_result(failure)   # the agent's own envelope passes the host's validation


def test_no_host_module_spells_a_protocol_constant_itself():
    """A literal equal to one of the agent's protocol values in pipeline/ is a copy that can drift."""
    values = {agent.EDGETPU_CUSTOM_OP, *agent.RUNTIME_ORDER}
    orders = {tuple(agent.RUNTIME_ORDER)}
    copies = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value == agent.EDGETPU_CUSTOM_OP:
                copies.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
            if isinstance(node, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in node.elts):
                got = tuple(e.value for e in node.elts)
                if got in orders or (len(got) >= 3 and set(got) <= values and set(got) >= set(agent.RUNTIME_ORDER)):
                    copies.append(f"{path.relative_to(ROOT)}:{node.lineno} {got!r}")
    assert not copies, "protocol values copied on the host (import them from device_agents): " + "; ".join(copies)


def test_importing_the_agent_on_the_host_loads_only_the_standard_library():
    code = ("import sys; before = set(sys.modules); import device_agents.agent; "
            "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in "
            "('numpy', 'tensorflow', 'ai_edge_litert', 'tflite_runtime', 'pycoral', 'pipeline')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
