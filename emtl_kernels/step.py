"""MTLStep: the drop-in multi-task backward for any model and any optimiser.

``step.backward(losses)`` replaces ``sum(losses).backward()``: it writes the gradient of
Σ_i w_i L_i into every parameter's ``.grad`` (adding to what is there, as ``backward`` does),
with weights w computed from the losses and the task gradients on the shared parameters.

Where the bytes go in speed mode (P shared elements, T tasks, element size s):
- T backward passes; autograd allocates and writes each task's gradients (T·P·s written). They
  stay where autograd put them: :class:`TaskGradients` only points at them.
- The Gram pass reads them once (T·P·s read) and writes the T×T matrix.
- The combine pass reads them once more (T·P·s) and writes P·s straight into ``.grad`` (reading
  P·s more when ``.grad`` already holds a gradient to add to).
Memory mode instead reduces each task's gradients to a norm as soon as autograd returns them and
frees them, then runs one more backward of Σ_i w_i L_i: O(P) extra memory, one extra backward.

Nothing here reads a device value on the host: the weights, the non-finite check and the skip
all stay tensors, so the step can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Literal

import torch
from torch import Tensor

from . import backends
from .autograd_graph import graph_leaves
from .ops import task_gram, task_sq_norms, weighted_combine
from .task_gradients import SUPPORTED_DTYPES, TaskGradients
from .weightings import Weighting, make_weighting, relative_contributions

Mode = Literal["speed", "memory"]


@dataclass(frozen=True)
class StepRecord:
    """What one :meth:`MTLStep.backward` saw and did. Tensors on the losses' device; reading one
    on the host (to log it) waits for the step to finish, the step itself never does."""

    #: ``[T]`` the task losses, detached.
    losses: Tensor
    #: ``[T]`` float32 squared gradient norms ‖g_i‖² on the shared parameters (or ``norm_params``).
    sq_norms: Tensor
    #: ``[T, T]`` float32 Gram matrix of the task gradients; None in memory mode, which never forms it.
    gram: Tensor | None
    #: ``[T]`` r_i = L_i / (‖g_i‖ + eps); NaN for a task with no gradient on the shared parameters.
    relative_contributions: Tensor
    #: ``[T]`` the weights applied; all zero when the step was skipped.
    weights: Tensor
    #: ``[T]`` bool, tasks whose gradient on the shared parameters is zero (weight 1, not balanced).
    zero_gradient: Tensor
    #: 0-dim bool: a loss, a gradient norm or a weight was not finite; nothing was added to ``.grad``.
    skipped: Tensor

    @property
    def norms(self) -> Tensor:
        """``[T]`` the gradient norms ‖g_i‖."""
        return self.sq_norms.sqrt()


class MTLStep:
    """A multi-task backward that balances the tasks on their shared parameters.

    Args:
        shared_params: the parameters θ every task's loss depends on (the trunk). Frozen ones
            (``requires_grad=False``) are left out; all others must be leaf tensors on one device
            with one dtype (float32, bfloat16 or float16).
        weighting: a name from :data:`~emtl_kernels.WEIGHTINGS` ("emtl" (default),
            "gradnorm_scaling", "equal", "imtl_g", "mgda", "pcgrad", "cagrad", "aligned_mtl",
            "upgrad", "dualproj", "nash_mtl") or a :class:`~emtl_kernels.weightings.Weighting`
            instance. Those that read all of G need ``mode="speed"``.
        backend: kernels for the Gram and combine passes: "auto" or a name from
            :func:`emtl_kernels.available_backends`.
        mode: "speed" keeps the T task gradients (T·P extra memory) and combines them with one
            fused pass; "memory" keeps only their norms (O(P) extra memory) and runs one more
            backward; it serves weightings that read the norms (and ‖Σ_i g_i‖) only.
        norm_params: a subset of ``shared_params`` (the last shared layer, say) to take the
            norms and Gram matrix over: cheaper, an approximation. The update still covers every
            shared parameter, by one more backward of Σ_i w_i L_i.
        batched_backward: compute the T task gradients in one vectorised backward
            (``is_grads_batched``) instead of T backward passes; speed mode only. Faster for
            small models; every op of the model must support ``torch.vmap``.
        **weighting_options: options of a weighting given by name (EMTL: ``lam``, ``eps``,
            ``min_weight``; gradient-norm scaling: ``target``, ``eps``; the others: the keyword
            arguments of their ``*_weights`` function, e.g. CAGrad's ``c``).

    After :meth:`backward`, :attr:`last` holds a :class:`StepRecord`. Every parameter the losses
    reach that is not shared (the task heads) gets the gradient of Σ_i w_i L_i too.
    """

    #: Whether the step itself reduces the gradients over data-parallel ranks.
    reduces_over_ranks = False

    def __init__(
        self,
        shared_params: Iterable[Tensor],
        weighting: str | Weighting = "emtl",
        *,
        backend: str = "auto",
        mode: Mode = "speed",
        norm_params: Iterable[Tensor] | None = None,
        batched_backward: bool = False,
        **weighting_options,
    ):
        self.shared_params = _trainable_params(shared_params, "shared_params")
        self._shared_ids = {id(p) for p in self.shared_params}
        self.norm_params = None if norm_params is None else _trainable_params(norm_params, "norm_params")
        if self.norm_params is not None and any(id(p) not in self._shared_ids for p in self.norm_params):
            raise ValueError("norm_params must be a subset of shared_params")
        self.weighting = make_weighting(weighting, **weighting_options)
        if mode not in ("speed", "memory"):
            raise ValueError(f"mode must be 'speed' or 'memory', got {mode!r}")
        if mode == "memory" and self.weighting.gram_use == "full":
            raise ValueError(
                f"{self.weighting!r} reads the whole Gram matrix, which mode='memory' never forms; use mode='speed'"
            )
        if batched_backward and mode == "memory":
            raise ValueError("batched_backward keeps all T task gradients at once: use it with mode='speed'")
        if backend != "auto" and backend not in backends.backend_names():
            raise ValueError(f"unknown backend {backend!r}; known: auto, {', '.join(backends.backend_names())}")
        if not self.reduces_over_ranks:
            _warn_if_data_parallel()
        self.backend = backend
        self.mode: Mode = mode
        self.batched_backward = batched_backward
        self.num_tasks: int | None = None
        self.last: StepRecord | None = None

    def backward(self, losses: Tensor | Sequence[Tensor], *, retain_graph: bool = False) -> Tensor:
        """Write the gradient of Σ_i w_i L_i into ``.grad`` and return the weights ``[T]``.

        ``losses`` is a 1-D tensor of T losses or a sequence of T scalar losses, each with a
        graph to the shared parameters; T is fixed by the first call. When a loss, a gradient
        norm or a weight is not finite, nothing is added to any ``.grad`` (parameters without one
        get zeros), the weights are zero and ``last.skipped`` is True; see :meth:`optimizer_step`.
        """
        loss_list = self._checked_losses(losses)
        loss_vector = torch.stack([loss.detach() for loss in loss_list])
        heads = [leaf for leaf in graph_leaves(loss_list) if id(leaf) not in self._shared_ids]
        if self.mode == "speed" and self.norm_params is None:
            self._combine_task_gradients(loss_list, loss_vector, heads, retain_graph)
        else:
            self._backward_weighted_sum(loss_list, loss_vector, heads, retain_graph)
        return self._record_of_last_call().weights

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``optimizer.step()`` unless the last backward was skipped; returns whether it stepped.

        Reads the skip flag on the host, one wait per step, as ``GradScaler.step`` does. Code that
        must not wait reads ``last.skipped`` itself (a fused optimiser takes it as ``found_inf``).
        """
        if bool(self._record_of_last_call().skipped):
            return False
        optimizer.step()
        return True

    def _record_of_last_call(self) -> StepRecord:
        if self.last is None:
            raise RuntimeError("no backward() has run on this step yet")
        return self.last

    # Speed mode: J is kept, the update is one fused combine pass.
    def _combine_task_gradients(self, losses, loss_vector, heads, retain_graph) -> None:
        per_task = self._task_gradients(losses, self.shared_params + heads, retain_graph)
        targets, jacobian = self._shared_jacobian(per_task)
        record = self._record(loss_vector, task_gram(jacobian, backend=self.backend), gram_formed=True)
        outs, accumulate = grad_destinations(targets)
        weighted_combine(jacobian, record.weights, out=outs, accumulate=accumulate, backend=self.backend)
        for head, grad in zip(heads, self._head_gradients(per_task, record.weights), strict=True):
            accumulate_grad(head, grad, record.skipped)

    # The pieces of a speed-mode step, shared with the distributed step. ``per_task[i]`` holds task
    # i's gradients on the shared parameters (in order), then on the heads; None where it has none.
    def _reached_shared(self, per_task: Sequence[Sequence[Tensor | None]]) -> list[int]:
        """Indices of the shared parameters some loss reaches; warns for each loss that reaches none."""
        num_shared = len(self.shared_params)
        reached = [k for k in range(num_shared) if any(grads[k] is not None for grads in per_task)]
        if not reached:
            raise ValueError("no loss reaches any of the shared parameters")
        for i, grads in enumerate(per_task):
            _warn_if_disconnected(i, grads[:num_shared])
        return reached

    def _shared_jacobian(self, per_task) -> tuple[list[Tensor], TaskGradients]:
        """The shared parameters some loss reaches, and J on them (zeros where a task has none)."""
        reached = self._reached_shared(per_task)
        targets = [self.shared_params[k] for k in reached]
        return targets, TaskGradients(task_rows(per_task, reached, targets))

    def _head_gradients(self, per_task, weights: Tensor) -> list[Tensor | None]:
        """Σ_i w_i ∇L_i on each input after the shared parameters (the heads); None where no loss
        reaches one."""
        return [
            _weighted_sum([(i, grads[j]) for i, grads in enumerate(per_task) if grads[j] is not None], weights)
            for j in range(len(self.shared_params), len(per_task[0]))
        ]

    # Memory mode, or norms on a subset: stats from T backward passes, then Σ w_i L_i backward.
    def _backward_weighted_sum(self, losses, loss_vector, heads, retain_graph) -> None:
        scope = self.norm_params or self.shared_params
        if self.mode == "speed":
            per_task = self._task_gradients(losses, scope, retain_graph=True)
            for i, grads in enumerate(per_task):
                _warn_if_disconnected(i, grads)
            gram = task_gram(TaskGradients([zeros_for_missing(g, scope) for g in per_task]), backend=self.backend)
            record = self._record(loss_vector, gram, gram_formed=True)
        else:
            record = self._record(loss_vector, self._gram_from_norms(losses, scope), gram_formed=False)
        targets = self.shared_params + heads
        weighted_loss = sum(w * loss for w, loss in zip(record.weights.unbind(0), losses, strict=True))
        grads = torch.autograd.grad(weighted_loss, targets, retain_graph=retain_graph, allow_unused=True)
        for param, grad in zip(targets, grads, strict=True):
            accumulate_grad(param, grad, record.skipped)

    def _gram_from_norms(self, losses: list[Tensor], scope: list[Tensor]) -> Tensor:
        """A T×T matrix with the exact diagonal ‖g_i‖² (and, where the weighting reads it, the
        exact total ‖Σ_i g_i‖² spread over the off-diagonal entries; else NaN there), built one
        task at a time so that only one task's gradients are alive at once."""
        num_tasks = len(losses)
        wants_total = self.weighting.gram_use == "diagonal_and_total"
        summed = [torch.zeros_like(p, dtype=torch.float32) for p in scope] if wants_total else None
        norms_by_task = []
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, scope, retain_graph=True, allow_unused=True)
            _warn_if_disconnected(i, grads)
            present = [g for g in grads if g is not None]
            if present:
                norms_by_task.append(task_sq_norms(TaskGradients([present]), backend=self.backend)[0])
            else:
                norms_by_task.append(torch.zeros((), dtype=torch.float32, device=loss.device))
            if summed is not None:
                torch._foreach_add_(summed, list(zeros_for_missing(grads, scope)))
        sq_norms = torch.stack(norms_by_task)
        off_diagonal = torch.full((), math.nan, dtype=torch.float32, device=sq_norms.device)
        if summed is not None and num_tasks > 1:
            total = task_sq_norms(TaskGradients([summed]), backend=self.backend)[0]
            off_diagonal = (total - sq_norms.sum()) / (num_tasks * (num_tasks - 1))
        eye = torch.eye(num_tasks, dtype=torch.bool, device=sq_norms.device)
        return torch.where(eye, torch.diag(sq_norms), off_diagonal)

    def _task_gradients(self, losses, inputs, retain_graph) -> list[tuple[Tensor | None, ...]]:
        """Per task, the gradients of its loss on ``inputs`` (None where it does not reach one)."""
        num_tasks = len(losses)
        if self.batched_backward:
            stacked = torch.stack(losses)
            eye = torch.eye(num_tasks, dtype=stacked.dtype, device=stacked.device)
            blocks = torch.autograd.grad(
                stacked,
                inputs,
                grad_outputs=eye,
                is_grads_batched=True,
                retain_graph=retain_graph,
                allow_unused=True,
            )
            return [tuple(None if b is None else b[i] for b in blocks) for i in range(num_tasks)]
        return [
            torch.autograd.grad(loss, inputs, retain_graph=retain_graph or i < num_tasks - 1, allow_unused=True)
            for i, loss in enumerate(losses)
        ]

    def _record(self, loss_vector: Tensor, gram: Tensor, *, gram_formed: bool) -> StepRecord:
        raw_weights = self.weighting(loss_vector, gram)
        sq_norms = gram.diagonal()
        finite = torch.isfinite(loss_vector).all() & torch.isfinite(sq_norms).all() & torch.isfinite(raw_weights).all()
        skipped = ~finite
        eps = getattr(self.weighting, "eps", 1e-8)
        self.last = StepRecord(
            losses=loss_vector,
            sq_norms=sq_norms,
            gram=gram if gram_formed else None,
            relative_contributions=relative_contributions(loss_vector, gram, eps=eps),
            weights=torch.where(skipped, 0.0, raw_weights),
            zero_gradient=sq_norms == 0,
            skipped=skipped,
        )
        return self.last

    def _checked_losses(self, losses: Tensor | Sequence[Tensor]) -> list[Tensor]:
        if isinstance(losses, Tensor):
            if losses.dim() != 1:
                raise ValueError(
                    f"losses must be a 1-D tensor of T losses or a sequence of scalar losses, "
                    f"got a tensor of shape {tuple(losses.shape)}"
                )
            loss_list = list(losses.unbind(0))
        else:
            loss_list = list(losses)
        if not loss_list:
            raise ValueError("losses is empty: MTLStep needs at least one task loss")
        device = self.shared_params[0].device
        for i, loss in enumerate(loss_list):
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(f"loss {i} must be a scalar tensor, got {shape}")
            if not loss.is_floating_point():
                raise TypeError(f"loss {i} has dtype {loss.dtype}; losses must be floating point")
            if loss.grad_fn is None:
                raise ValueError(f"loss {i} has no autograd graph (it does not require grad)")
            if loss.device != device:
                raise ValueError(f"loss {i} is on {loss.device}, the shared parameters on {device}")
        if self.num_tasks is None:
            self.num_tasks = len(loss_list)
        elif len(loss_list) != self.num_tasks:
            raise ValueError(f"this step was first called with T={self.num_tasks} losses, now with {len(loss_list)}")
        return loss_list


def _warn_if_disconnected(task: int, grads: Sequence[Tensor | None]) -> None:
    # Known from the graph's shape, not from values: warning costs no device sync.
    if all(g is None for g in grads):
        warnings.warn(
            f"loss {task} has no path to the shared parameters: it keeps weight 1 and is "
            "reported in step.last.zero_gradient",
            stacklevel=_caller_stacklevel(),
        )


def _warn_if_data_parallel() -> None:
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1:
        warnings.warn(
            "MTLStep computes this rank's gradients only: DDP's and FSDP's reductions do not run "
            "on them, so ranks would drift apart; use DistributedMTLStep",
            stacklevel=_caller_stacklevel(),
        )


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside this package."""
    frame: FrameType | None = sys._getframe(2)
    level = 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith(f"{__package__}."):
        frame, level = frame.f_back, level + 1
    return level


def _trainable_params(params: Iterable[Tensor], what: str) -> list[Tensor]:
    params = [params] if isinstance(params, Tensor) else list(params)
    if not params:
        raise ValueError(f"{what} is empty: give the parameters shared by the tasks")
    seen: set[int] = set()
    for k, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{what}[{k}] is a {type(p).__name__}, not a tensor")
        if not p.is_floating_point():
            raise TypeError(f"{what}[{k}] has dtype {p.dtype}: parameters must be floating point")
        if not p.is_leaf:
            raise ValueError(f"{what}[{k}] is not a leaf tensor: give parameters, not results of ops")
        if id(p) in seen:
            raise ValueError(f"{what}[{k}] appears twice")
        seen.add(id(p))
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError(f"every tensor in {what} is frozen (requires_grad=False): nothing to train")
    if len({p.device for p in trainable}) > 1:
        raise ValueError(f"{what} are on several devices ({sorted({str(p.device) for p in trainable})}): one device")
    dtypes = {p.dtype for p in trainable}
    if len(dtypes) > 1 or not dtypes <= set(SUPPORTED_DTYPES):
        raise TypeError(f"{what} must share one dtype among {SUPPORTED_DTYPES}, got {sorted(map(str, dtypes))}")
    return trainable


def task_rows(per_task, indices: Sequence[int], like: Sequence[Tensor]) -> list[list[Tensor]]:
    """Each task's gradients on ``per_task`` columns ``indices``, zeros shaped like ``like`` where
    it has none: the rows of J."""
    return [zeros_for_missing([grads[k] for k in indices], like) for grads in per_task]


def zeros_for_missing(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor]:
    """``grads``, with zeros shaped like the parameter where a gradient is None."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def grad_destinations(params: list[Tensor]) -> tuple[list[Tensor], bool]:
    """Each parameter's ``.grad`` to write into, and whether to add to it. Missing gradients are
    allocated uninitialised when none exists (nothing to add to: no fill pass), zeroed otherwise."""
    missing = [p.grad is None for p in params]
    for p, is_missing in zip(params, missing, strict=True):
        if is_missing:
            p.grad = torch.empty_like(p) if all(missing) else torch.zeros_like(p)
    return [p.grad for p in params if p.grad is not None], not all(missing)


def _weighted_sum(terms: list[tuple[int, Tensor]], weights: Tensor) -> Tensor | None:
    total = None
    for i, grad in terms:
        total = grad * weights[i] if total is None else total.addcmul_(grad, weights[i])
    return total


def accumulate_grad(param: Tensor, grad: Tensor | None, skipped: Tensor) -> None:
    """``param.grad += grad``, or nothing at all (not even NaN) when the step is skipped."""
    if grad is None:
        return
    grad = torch.where(skipped, 0.0, grad).to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)
