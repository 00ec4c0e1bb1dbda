"""A JAX-style training loop for a BatchNorm network, with torch.func and precisebn.

Parameters, BN buffers and optimiser state are plain dicts of tensors (pytrees).
The loss is a pure function of them; ``torch.func.grad_and_value`` differentiates
it; the optimiser step is a pure ``optree.tree_map``. A ``precisebn.recorder``, built
once for the model, runs the network statelessly and hands back each BN layer's batch
moments as data, the way Flax returns ``batch_stats``, so nothing is mutated in place.

For evaluation the BN buffers are recomputed exactly for the final parameters with the
recorder's ``init`` / ``update`` / ``finalize``, and compared with the running averages
the loop kept along the way.

Run it with ``python examples/functional_training.py``: it trains a small
convolutional network on scikit-learn's bundled 8x8 digits in a few seconds on a
CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import optree
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import precisebn

Tree = dict[str, Tensor]
Batch = tuple[Tensor, Tensor]


# --8<-- [start:data]
# Data: scikit-learn's digits, as (images, labels) batches.
def load_digits(seed: int = 0) -> tuple[Batch, Batch]:
    """Images ``[N, 1, 8, 8]`` in [0, 1] and labels; 1400 train, 397 test."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    images, labels = images[order].unsqueeze(1), labels[order]
    train = images[:1400], labels[:1400]
    test = images[1400:], labels[1400:]
    return train, test


def batches(data: Batch, batch_size: int, *, seed: int) -> Iterator[Batch]:
    """One shuffled pass over ``data``; the last batch may be smaller."""
    images, labels = data
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield images[index], labels[index]


# --8<-- [end:data]


# --8<-- [start:model]
# The model: only its structure is used; its state lives in dicts.
def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


# --8<-- [end:model]


# --8<-- [start:loss]
# A pure loss: (params, buffers, batch) -> (loss, batch moments).
def loss_fn(
    recorder: precisebn.Recorder,
    params: Tree,
    buffers: Tree,
    batch: Batch,
) -> tuple[Tensor, precisebn.Stats]:
    images, labels = batch
    # BN layers normalise with the batch statistics, whose moments
    # come back as data next to the output.
    logits, moments = recorder.capture(
        images,
        params=params,
        buffers=buffers,
    )
    return F.cross_entropy(logits, labels), moments


# --8<-- [end:loss]


# --8<-- [start:optimiser]
# A pure optimiser over pytrees (Adam).
class AdamState(NamedTuple):
    step: int
    mu: Tree
    nu: Tree


def adam_init(params: Tree) -> AdamState:
    zeros = optree.tree_map(torch.zeros_like, params)
    return AdamState(step=0, mu=zeros, nu=zeros)


def adam_step(
    params: Tree,
    grads: Tree,
    state: AdamState,
    *,
    lr: float = 3e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> tuple[Tree, AdamState]:
    step = state.step + 1
    tree_map = optree.tree_map
    mu = tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
    nu = tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)

    def move(p: Tensor, m: Tensor, v: Tensor) -> Tensor:
        m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
        return p - lr * m_hat / (v_hat.sqrt() + eps)

    return tree_map(move, params, mu, nu), AdamState(step, mu, nu)


# --8<-- [end:optimiser]


# --8<-- [start:buffers]
# BN buffers as data: a moving average, and the exact recomputation.
def ema_buffers(
    buffers: Tree,
    moments: precisebn.Stats,
    momentum: float = 0.1,
) -> Tree:
    """A training-mode BatchNorm layer's in-place update, as a pure function."""
    batch = precisebn.finalize(moments, like=buffers)
    return {
        key: torch.lerp(old, batch[key], momentum) if key in batch else old
        for key, old in buffers.items()
    }


def precise_buffers(
    recorder: precisebn.Recorder,
    params: Tree,
    buffers: Tree,
    loader: Iterable[Batch],
) -> Tree:
    """Pool every batch through ``params``: the statistics of the data."""
    stats = recorder.init(buffers=buffers)
    for images, _ in loader:
        stats = recorder.update(
            stats,
            images,
            params=params,
            buffers=buffers,
        )
    return {**buffers, **recorder.finalize(stats, buffers=buffers)}


def predict(
    model: nn.Module,
    params: Tree,
    buffers: Tree,
    images: Tensor,
) -> Tensor:
    """Evaluation: a plain functional call; BN uses the given buffers."""
    with torch.no_grad():
        state = {**params, **buffers}
        return torch.func.functional_call(model, state, (images,))


def accuracy(
    model: nn.Module,
    params: Tree,
    buffers: Tree,
    data: Batch,
) -> float:
    images, labels = data
    predicted = predict(model, params, buffers, images).argmax(1)
    return (predicted == labels).float().mean().item()


# --8<-- [end:buffers]


# --8<-- [start:loop]
# The training loop: pure functions in, new pytrees out.
def main(
    epochs: int = 4,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    train, test = load_digits(seed)
    # eval() for good: capture() makes BN use batch statistics anyway, and
    # functional_call() in eval mode uses the buffers it is given.
    model = make_model().eval()
    recorder = precisebn.recorder(model)  # the BN layers, bound once
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    opt_state = adam_init(params)
    # Gradients with respect to the first argument, params;
    # the moments ride along as auxiliary output.
    loss_of_params = functools.partial(loss_fn, recorder)
    grad_fn = torch.func.grad_and_value(loss_of_params, has_aux=True)

    epoch_losses = []
    for epoch in range(epochs):
        losses = []
        for batch in batches(train, batch_size, seed=seed + epoch):
            grads, (loss, moments) = grad_fn(params, buffers, batch)
            params, opt_state = adam_step(params, grads, opt_state)
            buffers = ema_buffers(buffers, moments)
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))

    # Statistics of the final weights: one pass in training-size batches.
    loader = batches(train, batch_size, seed=seed)
    precise = precise_buffers(recorder, params, buffers, loader)
    return {
        "model": model,
        "params": params,
        "ema_buffers": buffers,
        "precise_buffers": precise,
        "train": train,
        "test": test,
        "epoch_losses": epoch_losses,
        "ema_accuracy": accuracy(model, params, buffers, test),
        "precise_accuracy": accuracy(model, params, precise, test),
    }


# --8<-- [end:loop]


if __name__ == "__main__":
    result = main()
    for epoch, loss in enumerate(result["epoch_losses"], 1):
        print(f"epoch {epoch}: mean training loss {loss:.4f}")
    print(f"test accuracy with EMA buffers:     {result['ema_accuracy']:.4f}")
    print(f"test accuracy with precise buffers: {result['precise_accuracy']:.4f}")
