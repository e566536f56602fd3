"""ckbn's lazy modules against torch's: they become ckbn's BatchNorm on their first forward, match
torch's numbers there, count once under a checkpoint and reject a bad eps without counting."""

import pytest
import torch

import ckbn

LAZY = {
    "1d": (ckbn.LazyBatchNorm1d, torch.nn.LazyBatchNorm1d, ckbn.BatchNorm1d, (4, 3, 5)),
    "2d": (ckbn.LazyBatchNorm2d, torch.nn.LazyBatchNorm2d, ckbn.BatchNorm2d, (4, 3, 2, 3)),
    "3d": (ckbn.LazyBatchNorm3d, torch.nn.LazyBatchNorm3d, ckbn.BatchNorm3d, (2, 3, 2, 2, 2)),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", LAZY)
def test_lazy_module_becomes_ckbn_class_and_matches_torch(kind, training):
    lazy_cls, torch_lazy_cls, ckbn_cls, shape = LAZY[kind]
    ours = lazy_cls(momentum=None, dtype=torch.float64).train(training)
    theirs = torch_lazy_cls(momentum=None, dtype=torch.float64).train(training)
    assert isinstance(ours, torch_lazy_cls) and ours.has_uninitialized_params()
    for _ in range(2):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        grad_output = torch.randn(shape, dtype=torch.float64)
        y_ours = ours(x)
        grads_ours = torch.autograd.grad(y_ours, [x, ours.weight, ours.bias], grad_output)
        y_theirs = theirs(x)
        grads_theirs = torch.autograd.grad(y_theirs, [x, theirs.weight, theirs.bias], grad_output)
        assert type(ours) is ckbn_cls and ours.num_features == shape[1]
        torch.testing.assert_close(y_ours, y_theirs)
        torch.testing.assert_close(grads_ours, grads_theirs)
        torch.testing.assert_close(ours.state_dict(), theirs.state_dict())


def test_lazy_first_forward_under_checkpoint_counts_once():
    for checkpoint in (ckbn.checkpoint, lambda f, x: torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False)):
        lazy = ckbn.LazyBatchNorm2d()
        x = torch.randn(4, 3, 2, 3, requires_grad=True)
        checkpoint(lazy, x).sum().backward()
        assert type(lazy) is ckbn.BatchNorm2d and lazy.num_batches_tracked.item() == 1
        oracle = torch.nn.BatchNorm2d(3)
        oracle(x)
        torch.testing.assert_close(lazy.running_var, oracle.running_var)


def test_lazy_module_rejects_bad_eps_without_counting():
    lazy = ckbn.LazyBatchNorm2d(eps=0.0)
    with pytest.raises(ValueError, match="batch_norm eps must be positive"):
        lazy(torch.randn(4, 3, 2, 2))
    assert lazy.num_batches_tracked.item() == 0
