"""Structured pruning of a dense network: whole hidden units removed, so the result is a smaller dense
network (fewer rows in one weight matrix, fewer columns in the next) that runs faster everywhere, not a
sparse mask that needs sparse kernels to pay.

A unit's importance is the L2 norm of its incoming weights and bias (Li et al. 2017, "Pruning filters for
efficient ConvNets", for dense units). The same share of every hidden layer goes; the output layer keeps all
of its units. Pure torch, no Spark: the compress stage fine-tunes what this returns (dlpipe.model.students).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from dlpipe.train.models import build_mlp

Dense = list[tuple[torch.Tensor, torch.Tensor]]  # (weight, bias) of each dense layer, input to output


def dense_layers(state: Mapping[str, torch.Tensor]) -> Dense:
    """The (weight, bias) of each dense layer of a network's state dict, in order. Refuses a network with
    other parameters (convolutions, normalization): only a chain of dense layers is rebuilt and pruned here.
    Scalars (a regressor's label mean and std) are not parameters of the network and are passed over."""
    layers: Dense = []
    for key, tensor in state.items():
        if tensor.dim() == 0:
            continue
        if key.endswith(".weight") and tensor.dim() == 2:
            bias = state.get(key[: -len("weight")] + "bias")
            if bias is None:
                raise ValueError(f"dense layer {key} has no bias: not a network of the built-in mlp")
            layers.append((tensor.detach().float(), bias.detach().float()))
        elif not (key.endswith(".bias") and key[: -len("bias")] + "weight" in state):
            raise ValueError(
                f"parameter {key} {tuple(tensor.shape)} is not a dense layer's: compress.prune and compress.distill "
                "take a network of dense layers (train.model.factory mlp)"
            )
    if len(layers) < 2:
        raise ValueError(f"a network of {len(layers)} dense layer(s) has no hidden layer to prune or distil")
    return layers


def mlp_of(layers: Dense, in_shape: Sequence[int]) -> nn.Sequential:
    """The built-in mlp (ReLU between dense layers, no dropout) holding these layers' weights."""
    widths = [w.shape[0] for w, _ in layers[:-1]]
    net = build_mlp(tuple(in_shape), layers[-1][0].shape[0], hidden=widths)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for linear, (w, b) in zip(linears, layers, strict=True):
            linear.weight.copy_(w)
            linear.bias.copy_(b)
    return net


def prune_layers(layers: Dense, sparsity: float) -> Dense:
    """The same dense layers with round(width x sparsity) of each hidden layer's units removed (at least one
    is kept): the least important rows of a layer's weight and bias go, and the matching columns of the
    next layer's weight."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"compress.prune.sparsity must be in [0, 1), got {sparsity}")
    out: Dense = []
    keep = None  # the previous layer's kept units: this layer's kept inputs
    for i, (w, b) in enumerate(layers):
        if keep is not None:
            w = w[:, keep]
        if i < len(layers) - 1:
            k = max(1, round(w.shape[0] * (1 - sparsity)))
            importance = torch.cat([w, b[:, None]], 1).norm(dim=1)
            keep = importance.topk(k).indices.sort().values
            w, b = w[keep], b[keep]
        out.append((w.clone(), b.clone()))
    return out


def widths(layers: Dense) -> list[int]:
    """The hidden widths of a chain of dense layers."""
    return [w.shape[0] for w, _ in layers[:-1]]
