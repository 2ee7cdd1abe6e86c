import dataclasses

import pytest
import torch

import semiseg
from semiseg.methods import Method, MethodParams, get_method, list_methods, register_method


def test_builtin_methods_registered():
    names = list_methods()
    assert names[0] == "supervised"
    assert len(names) == len(set(names))
    for name in names:
        cls = get_method(name)
        assert cls.name == name
        assert cls.summary and "\n" not in cls.summary


def test_unknown_method_lists_known_ones():
    with pytest.raises(KeyError, match="supervised"):
        get_method("no-such-method")


def test_duplicate_name_rejected():
    class Fake(Method):
        name = "supervised"
        summary = "x"

        def build(self):
            pass

        def training_step(self, batch):
            return {}

        def predict(self, x):
            return {}

    with pytest.raises(ValueError, match="already registered"):
        register_method(Fake)
    assert get_method("supervised") is not Fake


@pytest.mark.parametrize("name", list_methods())
def test_params_dataclass(name):
    cls = get_method(name)
    assert issubclass(cls.Params, MethodParams)
    defaults = cls.Params()
    assert dataclasses.asdict(cls.parse_params(None)) == dataclasses.asdict(defaults)


def test_parse_params_coerces_strings_and_rejects_unknown():
    cls = get_method("supervised")
    p = cls.parse_params({"lr": "0.01", "features": "4,8,16", "norm": "batch"})
    assert p.lr == 0.01 and p.features == (4, 8, 16) and p.norm == "batch"
    with pytest.raises(ValueError, match="unknown parameter"):
        cls.parse_params({"nope": 1})
    with pytest.raises(ValueError, match="cannot read"):
        cls.parse_params({"lr": "fast"})


def test_num_classes_must_count_background():
    with pytest.raises(ValueError, match="background"):
        semiseg.get_method("supervised")(1, 1)


def test_state_dict_round_trip():
    cls = get_method("supervised")
    a = cls(1, 2, params={"features": (4, 8)})
    b = cls(1, 2, params={"features": (4, 8)})
    b.load_state_dict(a.state_dict())
    for pa, pb in zip(a.nets["seg"].parameters(), b.nets["seg"].parameters()):
        assert torch.equal(pa, pb)
