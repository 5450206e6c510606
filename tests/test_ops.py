"""Every op of customlayers (its entry in customlayers._opdefs) passes torch.library.opcheck on each of its
samples, on every device present: schema, fake, autograd registration and the compiled kernels agree. The
op's own test file covers its values."""
import pytest
import torch

from customlayers import _ops
from customlayers._opdefs import OPDEFS, read_schemas
from conftest import DEVICES, requires_extension

SAMPLES = [(name, case) for name, d in OPDEFS.items() for case in d.samples]


@requires_extension()
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,case", SAMPLES, ids=[f"{name}-{case}" for name, case in SAMPLES])
def test_opcheck(device, name, case):
    args, kwargs = OPDEFS[name].samples[case](device)
    torch.library.opcheck(_ops.op(name), args, kwargs)


def test_every_op_is_one_entry():
    """The ops are schemas.def's, each with a reference, a fake, samples and bad inputs."""
    assert set(OPDEFS) == set(read_schemas()) == set(_ops.OPS)
    for name, d in OPDEFS.items():
        assert d.schema.startswith(f"{name}(") and callable(d.reference) and callable(d.fake)
        assert d.samples and d.bad_inputs, name


def test_schema_file_reading(tmp_path):
    """Comments and literals continued on the next lines read as the C++ compiler reads them."""
    path = tmp_path / "schemas.def"
    path.write_text('// CUSTOMLAYERS_OP(old, "old() -> ()")\nCUSTOMLAYERS_OP(a, "a(Tensor x, "  // x\n'
                    '   "int n=1) -> Tensor")\nCUSTOMLAYERS_OP( b ,"b() -> ()")\n')
    assert read_schemas(path) == {"a": "a(Tensor x, int n=1) -> Tensor", "b": "b() -> ()"}
