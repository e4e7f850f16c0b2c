"""A separate, fresh process that times models on this machine's CPU, as a deployed model runs.

Why: a search builds and frees thousands of decomposed layers and models. The heap it leaves
behind is fragmented, and in a fragmented heap every forward pass's intermediate tensors take longer
to allocate, so a model with more layers (a decomposed one) pays more than the original. Timed in
the process that had just searched, a plan that the search measured at 0.69 of the original measured
0.72-0.74 (the benchmark's CNN at batch 1); in a fresh process it measured 0.68. Searched with a
timing process, a plan measured 0.67 in the search's final check and 0.68-0.69 in the same worker
after the search (0.70 in the process that had searched). A deployed model
runs in a process that did not search, so :class:`TimingProcess` times in one:
``optimize(..., timing_process=True)``, or ``measure_latency(..., timing_process=worker)``.

The worker is a new interpreter (not a fork of this heap) and receives each model through
shared memory: the model's parameters and buffers are moved into shared memory once (their values are
unchanged) and the worker maps them without copying. The inputs are copied for every call, so the
caller's tensors are left as they are. The worker runs :func:`measure_latency` with the caller's options.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
import weakref
from collections.abc import Collection
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.multiprocessing  # noqa: F401  (registers the pickling of tensors through shared memory)
from torch import nn
from torch.utils._pytree import tree_map

from ..exceptions import EvaluationError, InvalidInputsError

__all__ = ["TimingProcess"]

#: glibc's malloc in the worker as in a process that has served for a while: blocks up to 32 MiB from
#: the heap, which keeps what it frees. Without this, the fresh worker timed the benchmark's models
#: at batch 8 5-10% slower than a process that had run for a while, and more noisily. The likely
#: cause: in a fresh process malloc maps each block over 128 KiB anew and gives the top of the heap
#: back after each forward pass, so every pass faults its activations' pages in again; a process
#: that has freed large blocks has raised both limits on its own. Other allocators ignore these.
_STEADY_HEAP = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}

#: models the worker keeps between calls (the search times the original beside each plan)
_KEPT_MODELS = 4

_LOAD_ERROR = ("the timing process cannot load the model ({}); its classes must be importable by name in a fresh "
               "interpreter (defined in a module, not in a script's __main__, a notebook cell or a function): move "
               "them into a module, or time in this process (timing_process=False)")


def _serve(fd: int) -> None:
    """The worker's loop on the socket ``fd``: first ``(sys.path, authkey)``; then requests ``(kind,
    ((token, model or None), ...), inputs, options)``, ``kind`` ``"latency"`` (one model:
    ``measure_latency``) or ``"ratio"`` (two: ``measure_ratio``), each answered ``("ok", result)``,
    ``("error", exception)`` or ``("resend", tokens)`` (models sent by token only that are no longer
    kept); ``None`` ends it."""
    from .latency import measure_latency, measure_ratio  # the worker's own import, in the fresh interpreter

    functions = {"latency": measure_latency, "ratio": measure_ratio}

    conn = Connection(fd)
    sys_path, authkey = conn.recv()
    sys.path[:] = sys_path  # the caller's modules (its model's classes) import as they do there
    # tensors arrive as file descriptors, handed over by the caller's resource sharer, which checks this key
    multiprocessing.current_process().authkey = authkey
    kept: collections.OrderedDict[int, nn.Module] = collections.OrderedDict()
    while True:
        try:
            message = conn.recv_bytes()
        except EOFError:  # the caller went away
            return
        try:
            request = pickle.loads(message)
        except Exception as exc:
            conn.send(("error", InvalidInputsError(_LOAD_ERROR.format(f"{type(exc).__name__}: {exc}"))))
            continue
        if request is None:
            return
        kind, sent, inputs, options = request
        del request, message
        for token, model in sent:
            if model is not None:
                kept[token] = model
        missing = [token for token, _ in sent if token not in kept]
        if missing:
            conn.send(("resend", missing))
            continue
        for token, _ in sent:
            kept.move_to_end(token)
        while len(kept) > _KEPT_MODELS:
            kept.popitem(last=False)
        try:
            reply: tuple[str, Any] = ("ok", functions[kind](*(kept[token] for token, _ in sent), inputs, **options))
        except Exception as exc:  # sent back and raised in the caller
            reply = ("error", exc)
        del sent, inputs
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError):
            conn.send(("error", EvaluationError(f"{type(reply[1]).__name__}: {reply[1]}")))


_SCALARS = (bool, int, float, str, type(None))


def _is_setting(value: Any) -> bool:
    """A plain value a forward pass reads as a setting: a conv's stride, a norm's eps, a flag of one's own."""
    return isinstance(value, _SCALARS) or (isinstance(value, tuple) and all(isinstance(v, _SCALARS) for v in value))


def _layout(model: nn.Module) -> tuple[Any, ...]:
    """What must be unchanged for the worker's copy of ``model`` to still be it: its modules and their
    settings, and each tensor's memory, shape and in-place version. (``training`` is left out: the
    worker times in eval mode whatever the mode.)"""
    return (tuple((id(m), tuple((k, v) for k, v in vars(m).items()
                                if not k.startswith("_") and k != "training" and _is_setting(v)))
                  for m in model.modules()),
            tuple((t.data_ptr(), tuple(t.shape), t._version) for t in (*model.parameters(), *model.buffers())))


class TimingProcess:
    """A worker process that times models for :func:`measure_latency` (CPU only).

    Start one, pass it as ``timing_process=`` to :func:`measure_latency` or :func:`ranksearch.optimize`,
    and close it (or use it as a context manager). The worker starts in a few seconds (a fresh
    interpreter imports torch). It is a new interpreter, not a fork or a spawn of this one: it never
    runs the caller's script again, so a script needs no ``if __name__ == "__main__"`` guard; the
    model's classes must be importable.

    A model is sent once and then named by a token while it is unchanged (the same modules with the
    same settings, the same tensors, no in-place update): sending one costs tens of milliseconds
    (MiniLM: about 50), and a search times the original beside every plan it checks.

    Example:
        >>> with TimingProcess() as worker:
        ...     ms = measure_latency(model, x, threads=1, timing_process=worker).ms
    """

    def __init__(self) -> None:
        if os.name != "posix":
            raise InvalidInputsError("TimingProcess hands the worker a socket, which needs Linux or macOS; time in "
                                     "this process (timing_process=False)")
        ours, theirs = socket.socketpair()
        self._process = subprocess.Popen(
            [sys.executable, "-c", f"from ranksearch.cost.timing_process import _serve; _serve({theirs.fileno()})"],
            pass_fds=(theirs.fileno(),), env={**os.environ, **_STEADY_HEAP,
                                              "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send((list(sys.path), bytes(multiprocessing.current_process().authkey)))
        self._sent: weakref.WeakKeyDictionary[nn.Module, tuple[int, tuple[Any, ...]]] = weakref.WeakKeyDictionary()
        self._tokens = itertools.count()
        self.models_sent = 0  # whole, not by token

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def measure(self, model: nn.Module, example_inputs: tuple[Any, ...], options: dict[str, Any]) -> Any:
        """``measure_latency(model, example_inputs, **options)`` run in the worker."""
        return self._run("latency", (model,), example_inputs, options)

    def measure_ratio(self, reference: nn.Module, model: nn.Module, example_inputs: tuple[Any, ...],
                      options: dict[str, Any]) -> Any:
        """``measure_ratio(reference, model, example_inputs, **options)`` run in the worker."""
        return self._run("ratio", (reference, model), example_inputs, options)

    def _run(self, kind: str, models: tuple[nn.Module, ...], example_inputs: tuple[Any, ...],
             options: dict[str, Any]) -> Any:
        """Ask the worker for ``kind`` on ``models``: those it has, unchanged, by token; the others whole."""
        if not self.alive:
            raise EvaluationError("the timing process has ended (closed, or killed from outside); start a new "
                                  "TimingProcess")
        inputs = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, example_inputs)
        answer = self._ask((kind, self._by_token_or_whole(models), inputs, options))
        if answer[0] == "resend":  # the worker let some of them go: send those again
            answer = self._ask((kind, self._by_token_or_whole(models, let_go=answer[1]), inputs, options))
        return self._answer(*answer)

    def _by_token_or_whole(self, models: tuple[nn.Module, ...],
                           let_go: Collection[int] = ()) -> tuple[tuple[int, nn.Module | None], ...]:
        """``(token, None)`` for a model the worker has unchanged; ``(new token, model)`` to send one whole
        (one it never had, changed since, or whose token is in ``let_go``). A model passed twice gets one token."""
        sent: dict[int, tuple[int, nn.Module | None]] = {}
        for model in models:
            if id(model) in sent:
                continue
            known = self._sent.get(model)
            if known is not None and known[1] == _layout(model) and known[0] not in let_go:
                sent[id(model)] = (known[0], None)
            else:
                sent[id(model)] = (next(self._tokens), model)
        return tuple(sent[id(model)] for model in models)

    def _ask(self, request: tuple[Any, ...]) -> tuple[str, Any]:
        """Send ``request``; record the models it carries whole as known to the worker by their token."""
        answer = self._send_and_receive(request)
        for token, model in dict(request[1]).items():  # a model passed twice was sent once
            if model is not None:
                self.models_sent += 1
                self._sent[model] = (token, _layout(model))  # after the send: its tensors are in shared memory
        return answer

    def _send_and_receive(self, request: tuple[Any, ...]) -> tuple[str, Any]:
        try:
            self._conn.send(request)
        except (pickle.PicklingError, TypeError, AttributeError, RuntimeError) as exc:
            raise InvalidInputsError(
                f"the model (or a timing option) cannot be sent to the timing process ({type(exc).__name__}: {exc}); "
                "a model timed in a separate process must be picklable (no lambdas or local classes in it): make it "
                "so, or time in this process (timing_process=False)"
            ) from exc
        try:
            return self._conn.recv()
        except EOFError as exc:
            raise EvaluationError(f"the timing process ended while timing (exit code {self._process.poll()}); "
                                  "the model may crash the interpreter, or the machine ran out of memory") from exc

    @staticmethod
    def _answer(kind: str, value: Any) -> Any:
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        """End the worker (idempotent)."""
        if self.alive:
            try:
                self._conn.send(None)
                self._process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()
        self._conn.close()

    def __enter__(self) -> TimingProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
