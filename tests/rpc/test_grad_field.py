"""``_grad_field.accumulate``: a computed gradient goes through its leaf's ``AccumulateGrad`` (its
hooks run, in torch's order) into a borrowed ``.grad`` and back out, without a copy of a dense
gradient; the field keeps what the user left in it."""

from __future__ import annotations

from typing import Any

import torch

from thenable.autograd import _grad_field


def _accumulator(leaf: torch.Tensor) -> Any:
    return (leaf * 1.0).grad_fn.next_functions[0][0]  # type: ignore[union-attr]


def test_dense_gradient_is_handed_over_without_a_copy_and_the_field_is_restored() -> None:
    leaf = torch.zeros(1000, 8, requires_grad=True)
    leaf.grad = torch.ones(1000, 8)
    kept = leaf.grad
    grad = torch.randn(1000, 8)
    ((got_leaf, got),) = _grad_field.accumulate([(leaf, grad)])
    assert got_leaf is leaf
    assert got.untyped_storage().data_ptr() == grad.untyped_storage().data_ptr()
    torch.testing.assert_close(got, grad, rtol=0, atol=0)
    assert leaf.grad is kept


def test_hooks_run_once_in_torchs_order_and_may_replace_the_gradient() -> None:
    leaf = torch.zeros(3, requires_grad=True)
    calls: list[Any] = []
    accumulator = _accumulator(leaf)

    def double(grads: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        calls.append("pre")
        return (grads[0] * 2,)

    accumulator.register_prehook(double)
    accumulator.register_hook(lambda grads_in, grads_out: calls.append("post"))
    leaf.register_post_accumulate_grad_hook(lambda t: calls.append(t.grad.clone()))  # type: ignore[no-untyped-call]
    ((_, got),) = _grad_field.accumulate([(leaf, torch.ones(3))])
    assert calls[0] == "pre" and calls[2] == "post" and len(calls) == 3
    torch.testing.assert_close(calls[1], torch.full((3,), 2.0))
    torch.testing.assert_close(got, torch.full((3,), 2.0))
    assert leaf.grad is None


def test_sparse_gradient_and_several_leaves() -> None:
    table = torch.zeros(5, 2, requires_grad=True)
    bias = torch.zeros(2, requires_grad=True)
    sparse = torch.sparse_coo_tensor(
        torch.tensor([[1, 3]]), torch.ones(2, 2), (5, 2), check_invariants=True
    )
    dense = torch.tensor([1.0, -1.0])
    got = dict(_grad_field.accumulate([(table, sparse), (bias, dense)]))
    assert got[table].is_sparse
    torch.testing.assert_close(got[table].to_dense(), sparse.to_dense())
    torch.testing.assert_close(got[bias], dense)
    assert table.grad is None and bias.grad is None


def test_accumulate_runs_under_no_grad_and_with_nothing_to_do() -> None:
    leaf = torch.zeros(2, requires_grad=True)
    with torch.no_grad():
        ((_, got),) = _grad_field.accumulate([(leaf, torch.ones(2))])
    torch.testing.assert_close(got, torch.ones(2))
    assert _grad_field.accumulate([]) == []


def test_tensor_hooks_are_seen() -> None:
    leaf = torch.zeros(2, requires_grad=True)
    assert not _grad_field.has_tensor_hooks(leaf)
    leaf.register_hook(lambda grad: grad)  # type: ignore[no-untyped-call]
    assert _grad_field.has_tensor_hooks(leaf)


def test_a_sparse_leaf_takes_a_dense_gradient() -> None:
    leaf = torch.sparse_coo_tensor(
        torch.tensor([[0, 2]]), torch.ones(2), (4,), check_invariants=True
    ).requires_grad_()
    grad = torch.tensor([1.0, 0.0, 3.0, 0.0])
    ((_, got),) = _grad_field.accumulate([(leaf, grad)])  # (a sparse leaf has no view)
    torch.testing.assert_close(got.to_dense(), grad)
    assert leaf.grad is None
