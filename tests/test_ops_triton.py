"""Triton kernels vs the reference path on CPU, under triton's interpreter, reported per test function.

The cases live in ops_triton_cases.py and run once, in a subprocess started with TRITON_INTERPRET=1:
triton fixes interpreter vs compiled mode when it is imported, and this pytest process may already have
imported it (see that module's docstring). This keeps the suite correct in one pytest process whatever
the import order, at the price of one extra interpreter start (~3 s).
"""
import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("ops_triton_cases.py")
FUNCTIONS = [  # every test function of ops_triton_cases.py (test_every_case_function_is_reported checks it)
    "test_group_norm_act_kernel",
    "test_group_norm_kernel_no_affine_noncontiguous",
    "test_gelu_kernel",
    "test_geglu_kernel",
    "test_flash_attention_kernel",
    "test_partial_softmax_attention_kernel",
    "test_attention_kernels_strided_inputs",
    "test_separable_conv_kernel",
    "test_ops_dispatch_to_triton",
    "test_flash_rejects_head_dim_over_128",
    "test_kernels_reject_float64",
    "test_compiled_kernel_refuses_cpu_tensors",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="triton is not installed (it is in the test extra)"),
]


class InnerRun(tuple):
    """(outcomes {test id: (outcome, message)}, pytest output), shown briefly in tracebacks."""

    def __repr__(self):
        return f"<interpreter run: {len(self[0])} cases>"


@pytest.fixture(scope="module")
def inner(tmp_path_factory):
    """Run the cases once in a subprocess with TRITON_INTERPRET=1."""
    tmp = tmp_path_factory.mktemp("triton_interpret")
    xml = tmp / "cases.xml"
    env = dict(os.environ, TRITON_INTERPRET="1", MD_TRITON_ERRORS_FILE=str(tmp / "errors.tsv"))
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", str(CASES)]
    proc = subprocess.run(cmd, cwd=CASES.parents[1], env=env, capture_output=True, text=True, timeout=1800)
    output = proc.stdout[-6000:] + proc.stderr[-3000:]
    if not xml.exists():
        pytest.fail(f"the interpreter run wrote no report (exit {proc.returncode}):\n{output}")
    outcomes = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        problem = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        outcome = "passed" if problem is None else problem.tag
        message = "" if problem is None else (problem.get("message") or "")[:500]
        outcomes[case.get("name")] = (outcome, message)
    return InnerRun((outcomes, output))


@pytest.mark.parametrize("function", FUNCTIONS)
def test_kernel_cases_pass_under_interpreter(inner, function):
    outcomes, output = inner
    cases = {name: res for name, res in outcomes.items() if name.split("[")[0] == function}
    assert cases, f"no case of {function} ran under the interpreter:\n{output}"
    bad = {name: res for name, res in cases.items() if res[0] != "passed"}
    assert not bad, "\n".join(f"{name}: {outcome}: {msg}" for name, (outcome, msg) in bad.items())


def test_every_case_function_is_reported(inner):
    outcomes, output = inner
    ran = {name.split("[")[0] for name in outcomes}
    assert ran == set(FUNCTIONS), f"cases not listed in FUNCTIONS: {ran - set(FUNCTIONS)}; " \
                                  f"listed but not run: {set(FUNCTIONS) - ran}\n{output}"
