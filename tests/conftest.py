import os

import pytest
import torch
from hypothesis import HealthCheck, settings


# Triton kernels run on CPU through the interpreter; the variable must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_real_empty = torch.empty
_real_empty_like = torch.empty_like
_real_new_empty = torch.Tensor.new_empty


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() and not isinstance(t, torch._subclasses.FakeTensor) and t.device.type != "meta":
        with torch.no_grad():  # also for torch.empty(..., requires_grad=True) leaves
            t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def nan_poisoned_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled memory, so a kernel that leaves part of an output
    unwritten (or reads memory nothing wrote) fails loudly instead of passing on lucky zeros."""
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: _poisoned(_real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: _poisoned(_real_empty_like(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: _poisoned(_real_new_empty(self, *a, **kw)))


# Hypothesis profiles of the property tests (tests/test_ops_properties.py). "ci" is loaded by default: a fixed
# budget and fixed examples (derandomize), so a run of the suite is repeatable and bounded (~50 s on 2 cores).
# "long" (`pytest --hypothesis-profile=long`, a nightly-style run: 5 and 16 min for the torch and the Triton test
# on 2 cores shared with other jobs) draws fresh examples on every run, keeps failures in .hypothesis/ to replay them
# first next time, and prints a reproduction blob.
# max_examples is the budget of the cheapest test; each test takes its share (test_ops_properties.py).
# The tests use function-scoped fixtures (NaN-poisoned torch.empty, the Triton device): they hold no
# per-example state, so hypothesis' warning about them does not apply.
_SHARED = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("ci", max_examples=240, derandomize=True, database=None, **_SHARED)
settings.register_profile("long", max_examples=1500, print_blob=True, **_SHARED)
settings.load_profile("ci")  # --hypothesis-profile=NAME (hypothesis' pytest plugin) loads another one after this


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")
    parser.addoption(
        "--soak-seconds",
        type=float,
        default=None,
        help="wall-clock seconds of each serving soak case (tests/test_serving_soak.py; default: its CI budget)",
    )


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: pass --runslow"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture
def triton_device():
    """Device for Triton engine tests: CUDA when present, else CPU through the interpreter."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 set before triton is imported")
    return "cpu"



@pytest.fixture
def real_torch_empty(monkeypatch):
    """Undo nan_poisoned_empty for a test that compiles third-party code calling torch.empty_like in the traced
    region. torch.compile looks torch's functions up by name when it builds its table of them (again after every
    init_process_group): built while the poisoning is in place, the table lacks the real function, and dynamo
    refuses the wrapper's call to it. So the table is rebuilt here, and after the test, from the real functions."""
    monkeypatch.setattr(torch, "empty", _real_empty)
    monkeypatch.setattr(torch, "empty_like", _real_empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", _real_new_empty)
    torch._dynamo.trace_rules.clear_lru_cache()
    yield
    torch._dynamo.trace_rules.clear_lru_cache()
