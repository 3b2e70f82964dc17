import math
import pickle

import pytest
import torch

from lightning_modules.lr_schedule import warmup_exponential_lambda


def test_values_at_key_steps():
    f = warmup_exponential_lambda(100, 20000, 0.01)
    assert f(0) == 0.0
    assert f(50) == pytest.approx(0.5)
    assert f(100) == pytest.approx(1.0)
    assert f(100 + (20000 - 100) // 2) == pytest.approx(0.1, rel=1e-3)  # halfway in log space: sqrt(0.01)
    assert f(20000) == pytest.approx(0.01)
    assert f(40000) == pytest.approx(0.01)
    assert f(19999) > 0.01 and f(101) < 1.0


def test_zero_warmup_and_monotone_decay():
    f = warmup_exponential_lambda(0, 10, 0.5)
    assert f(0) == 1.0
    assert f(5) == pytest.approx(math.sqrt(0.5))
    values = [f(n) for n in range(12)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize(
    "args", [(-1, 10, 0.1), (10, 10, 0.1), (10, 5, 0.1), (0, 10, 0.0), (0, 10, 1.5), (1.5, 10, 0.1)]
)
def test_invalid_arguments(args):
    with pytest.raises(ValueError):
        warmup_exponential_lambda(*args)


def test_lambdalr_and_pickle():
    f = warmup_exponential_lambda(2, 4, 0.25)
    assert pickle.loads(pickle.dumps(f))(3) == f(3)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.25, 0.25])
