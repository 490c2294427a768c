"""Forward hooks scoped to one call in one thread.

A forward hook registered on a shared model fires for *every* forward of that module,
also the forwards other threads run at the same time (a web server, a threaded data
pipeline). :class:`ScopedHooks` registers hooks that act only in the thread that
registered them and removes all of them when its ``with`` block ends, also when the
block raises. So several threads may explain one model at once: each call sees only its
own forward, and no lock is taken.

Everything a hook changes is thread-local too: PyTorch's grad mode and its
torch-function mode stack belong to the thread that sets them.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Callable, Iterator, List, Optional, Type

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["ScopedHooks", "mode_stack_guard"]


class ScopedHooks:
    """A set of forward hooks that act only in the registering thread.

    Examples::

        >>> with ScopedHooks() as hooks:
        ...     hooks.forward_pre(block, lambda module, args: None)
        ...     model(x)  # the hook runs for this thread's forward only
        >>> # all hooks are removed here
    """

    def __init__(self) -> None:
        self._owner = threading.get_ident()
        self._handles: List[RemovableHandle] = []

    def _own(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        owner = self._owner

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != owner:
                return None  # another thread's forward of the same module
            return hook(*args, **kwargs)

        return guarded

    def forward_pre(
        self, module: nn.Module, hook: Callable[..., Any], *, with_kwargs: bool = False
    ) -> None:
        """``module.register_forward_pre_hook(hook)``, acting in this thread only."""
        self._handles.append(
            module.register_forward_pre_hook(self._own(hook), with_kwargs=with_kwargs)
        )

    def forward(
        self,
        module: nn.Module,
        hook: Callable[..., Any],
        *,
        always_call: bool = False,
    ) -> None:
        """``module.register_forward_hook(hook)``, acting in this thread only.

        ``always_call=True`` runs the hook also when the module's forward raises.
        """
        self._handles.append(module.register_forward_hook(self._own(hook), always_call=always_call))

    def remove(self) -> None:
        """Remove every hook registered so far."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> ScopedHooks:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.remove()


@contextmanager
def mode_stack_guard() -> Iterator[None]:
    """Pop any torch-function mode an interrupted forward left on this thread's stack."""
    depth = torch._C._len_torch_function_stack()
    try:
        yield
    finally:
        while torch._C._len_torch_function_stack() > depth:
            torch._C._pop_torch_function_stack()
