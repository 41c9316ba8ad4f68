"""scripts/profile_cpu.py reads XLA's optimized HLO text: instructions to dsv4 source lines through
its stack-frame tables, and loops as containers. A change of that text format fails here."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from profile_cpu import containers, source_lines  # noqa: E402

from dsv4 import layers  # noqa: E402


def test_instructions_map_to_dsv4_source_lines_and_loops_are_containers():
    def program(x, w):
        return jax.lax.fori_loop(0, 3, lambda i, a: layers.rms_norm(a @ w, 1e-6), x)

    x = jnp.ones((4, 8), jnp.float32)
    hlo = jax.jit(program).lower(x, jnp.eye(8)).compile().as_text()
    lines = set(source_lines(hlo).values())
    first = inspect.getsourcelines(layers.rms_norm)[1]
    last = first + len(inspect.getsourcelines(layers.rms_norm)[0])
    inv_first = inspect.getsourcelines(layers.inv_rms)[1]
    own = {line for line in lines if line.startswith("dsv4/layers.py:")}
    assert own, lines
    for line in own:
        number, func = int(line.split(":")[1].split()[0]), line.split()[-1]
        assert (func == "rms_norm" and first <= number < last) or (func == "inv_rms" and number > inv_first), line
    assert any(name.startswith("while") for name in containers(hlo))


def test_a_dot_fusion_without_metadata_is_charged_to_its_operands_line():
    """YNNPACK's dot fusions carry no metadata, nor does the computation they call: such a fusion
    is charged to its first operand's line, marked as read by a dot."""
    from profile_cpu import REPO

    hlo = f"""HloModule m
FileNames
1 "{REPO}/dsv4/attention.py"
FunctionNames
1 "_entry_part"
FileLocations
1 {{file_name_id=1 function_name_id=1 line=466 end_line=466 column=1 end_column=9}}
StackFrames
1 {{file_location_id=1 parent_frame_id=1}}

%fused_computation.1 (param_0: f32[4,4], param_1: f32[4,4]) -> f32[4,4] {{
  %param_0 = f32[4,4]{{1,0}} parameter(0)
  %param_1 = f32[4,4]{{1,0}} parameter(1)
  ROOT %dot.1 = f32[4,4]{{1,0}} dot(%param_0, %param_1), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
}}

ENTRY %main (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {{
  %p0 = f32[4,4]{{1,0}} parameter(0)
  %p1 = f32[4,4]{{1,0}} parameter(1)
  %gathered = f32[4,4]{{1,0}} negate(%p0), metadata={{op_name="neg" stack_frame_id=1}}
  ROOT %ynn_fusion = f32[4,4]{{1,0}} fusion(%p1, %gathered), kind=kCustom, calls=%fused_computation.1
}}
"""
    lines = source_lines(hlo)
    assert lines["gathered"] == "dsv4/attention.py:466 _entry_part"
    assert lines["ynn_fusion"] == "dsv4/attention.py:466 _entry_part (read by a dot)"
    assert "p1" not in lines
