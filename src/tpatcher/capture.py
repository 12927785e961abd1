"""Record module inputs and outputs during one forward pass.

The cached training loop runs the model once per edit and keeps what the tail needs: the
last FFN's inputs, its output, and the tensor the block's output is rebuilt from. Hooks record
only in the thread that opened the recorder, so a server's concurrent requests are not mixed
into an edit's capture.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

Point = tuple[nn.Module, Literal["input", "output"]]


def _first_tensor(value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"cannot record a {type(value).__name__}")


@contextmanager
def record(points: dict[str, Point]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, forward passes of this thread store each point's tensor (detached).

    A point that runs more than once keeps its last value.
    """
    owner = threading.get_ident()
    store: dict[str, torch.Tensor] = {}
    handles = []

    for name, (module, kind) in points.items():
        if kind == "input":

            def pre_hook(module: nn.Module, args: tuple, name: str = name) -> None:
                if threading.get_ident() == owner:
                    store[name] = _first_tensor(args).detach()

            handles.append(module.register_forward_pre_hook(pre_hook))
        else:

            def hook(module: nn.Module, args: tuple, output: object, name: str = name) -> None:
                if threading.get_ident() == owner:
                    store[name] = _first_tensor(output).detach()

            handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()
