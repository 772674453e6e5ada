"""state_dict holds everything needed to continue: a resumed run is bit-identical to an uninterrupted one."""
import copy
from pathlib import Path

import pytest
import torch

from scaffold import assert_same_parameters, checkpoint, resumed_in_fresh_process
from state_worker import build, resume, train

HERE = Path(__file__).parent


@pytest.mark.parametrize("name", ["fop", "kfac"])
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path, name):
    model, maker, opt = build(name)
    train(model, maker, opt, range(3))  # steps 0, 2 update curvature (interval 2): EMA and inverses exist
    torch.save(checkpoint(model, maker, opt), tmp_path / "ckpt.pt")
    train(model, maker, opt, range(3, 8))
    assert_same_parameters(model, resumed_in_fresh_process(HERE / "state_worker.py", tmp_path, name))


def test_state_dict_holds_factors_inverses_and_step():
    model, maker, opt = build("fop")
    train(model, maker, opt, range(3))
    state = maker.state_dict()
    assert state["step"] == 3
    linear = state["curvature"]["4"]
    assert set(linear) == {"kron.A", "kron.B", "kron.A_inv", "kron.B_inv"}
    assert set(state["curvature"]["1"]) == {"unit.data", "unit.inv"}  # BatchNorm
    # and it is a copy: training on does not change a saved state
    saved = linear["kron.A"].clone()
    train(model, maker, opt, range(3, 5))
    assert torch.equal(state["curvature"]["4"]["kron.A"], saved)


def test_loading_a_state_of_another_model_fails_clearly():
    _, maker, _ = build("fop")
    with pytest.raises(KeyError, match="blocks this model does not have"):
        maker.load_state_dict({"step": 0, "curvature": {"decoder.fc": {}}})


def test_resume_in_process_matches_too():
    model, maker, opt = build("fop")
    train(model, maker, opt, range(3))
    state = copy.deepcopy(checkpoint(model, maker, opt))  # state_dicts share tensors with the live objects
    other = resume("fop", state)
    train(model, maker, opt, range(3, 6))
    train(*other, range(3, 6))
    for p, q in zip(model.parameters(), other[0].parameters()):
        assert torch.equal(p, q)
