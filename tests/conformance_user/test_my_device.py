"""A team's own pytest suite importing refvit's conformance suite, as docs/golden-format.md shows it
("From pytest"). tests/test_conformance_user.py runs this folder as a pytest session of its own and checks
the pass / skip counts."""
import conformance
from my_device import MyDUT


@conformance.parametrize_cases("quick", dut=MyDUT)    # one test per case; the ops MyDUT lacks are SKIP
def test_conformance(case):
    conformance.check(MyDUT(), case)


@conformance.parametrize_cases("quick", dut=MyDUT, ops=["requantize"], rounding="SINGLE_ROUND")
def test_requantize_single_round(case):
    conformance.check(MyDUT(), case)


class MyDUTWithRefvit(MyDUT, conformance.RefvitDUT):
    """MyDUT's methods where it has them, refvit's for every other op: block and model cases run."""


@conformance.parametrize_cases("quick", dut=MyDUTWithRefvit, ops=["block"])
def test_blocks_on_my_kernels(case):
    conformance.check(MyDUTWithRefvit(), case)
