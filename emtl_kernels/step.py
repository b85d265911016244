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
Memory mode never holds J; it runs one more backward of Σ_i w_i L_i for the update. A weighting
that reads all of G gets it from one vectorised backward whose per-parameter task gradients are
reduced into G as soon as autograd produces them (:mod:`.streamed_gram`: the extra memory is about
P·s plus the T-fold activation gradients and T times the largest parameter); one that reads only
the norms gets them from T backward passes, each task's gradients reduced to a norm and freed
(O(P) extra memory), or from the same vectorised backward with ``batched_backward``.

The skip check (:mod:`.skip_check`) adds nothing to these passes in float32 and bfloat16: the
combination is certified finite from G and the weights. Float16 storage checks the written
values instead: one more read of P·s, one masked write of P·s, and a copy of ``.grad`` (P·s read
and written) first where it already held values.

Two paths cost about one backward: features mode (:mod:`.features`: G from the gradients on the
trunk's outputs, one backward of the trunk) and weightings that read no gradients (equal
weighting), which run one backward of Σ_i w_i L_i and check its gradients before writing them.

Nothing here reads a device value on the host: the weights, the non-finite checks and the skip
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
from .features import (
    check_every_feature_reached,
    checked_features,
    feature_jacobian,
    split_at_features,
    weighted_cotangents,
)
from .grad_writes import (
    accumulate_grad,
    backups_of,
    backward_into_grads,
    give_empty_grads,
    grad_destinations,
    summed_terms,
    undo_if,
    values_to_check,
)
from .ops import task_gram, task_sq_norms, weighted_combine
from .skip_check import SKIP_REASONS, SkipCheck, combination_bounded
from .streamed_gram import streamed_gram
from .task_gradients import SUPPORTED_DTYPES, TaskGradients
from .weightings import Weighting, make_weighting, relative_contributions

Mode = Literal["speed", "memory"]
HeadGradients = Literal["weighted", "unweighted"]


@dataclass(frozen=True)
class StepRecord:
    """What one :meth:`MTLStep.backward` saw and did. Tensors on the losses' device; reading one
    on the host (to log it) waits for the step to finish, the step itself never does."""

    #: ``[T]`` the task losses, detached.
    losses: Tensor
    #: ``[T]`` float32 squared gradient norms ‖g_i‖² on the shared parameters (or ``norm_params``,
    #: or in features mode the features: ‖∂L_i/∂z‖²); inf where a norm is beyond float32's range
    #: (~1.8e19) or a gradient holds inf; NaN for a weighting that reads no gradients (none measured).
    sq_norms: Tensor
    #: ``[T, T]`` float32 Gram matrix of the task gradients (G_z in features mode); None where memory
    #: mode measured only the norms, and for a weighting that reads no gradients.
    gram: Tensor | None
    #: ``[T]`` r_i = L_i / (‖g_i‖ + ε), ε the weighting's ``contribution_eps``, from the same norms
    #: (in features mode, features-space contributions L_i / ‖∂L_i/∂z‖); NaN for a task with no
    #: gradient on the shared parameters.
    relative_contributions: Tensor
    #: ``[T]`` the weights applied; all zero when the step was skipped.
    weights: Tensor
    #: ``[T]`` bool, tasks whose gradient on the shared parameters is zero (weight 1, not balanced).
    zero_gradient: Tensor
    #: 0-dim bool: the step was skipped (see :class:`MTLStep`); no ``.grad`` changed.
    skipped: Tensor
    #: ``[4]`` bool: why, by the names of :data:`SKIP_REASONS` ("loss", "sq_norm", "weight",
    #: "update"); all False when the step was not skipped.
    skip_reasons: Tensor

    @property
    def norms(self) -> Tensor:
        """``[T]`` the gradient norms ‖g_i‖."""
        return self.sq_norms.sqrt()

    def why_skipped(self) -> list[str]:
        """The names of the :data:`SKIP_REASONS` that held (empty if the step was not skipped).
        Reads the flags on the host: it waits for the step to finish."""
        return [name for name, held in zip(SKIP_REASONS, self.skip_reasons.tolist(), strict=True) if held]


class MTLStep:
    """A multi-task backward that balances the tasks on their shared parameters.

    Args:
        shared_params: the parameters θ every task's loss depends on (the trunk). Frozen ones
            (``requires_grad=False``) are left out; all others must be dense leaf tensors on one
            device with one dtype (float32, bfloat16 or float16). One without elements
            contributes nothing; it gets an empty ``.grad`` when a loss reaches it.
        weighting: a name from :data:`emtl_kernels.weightings.WEIGHTINGS` ("emtl" by default)
            or a :class:`~emtl_kernels.weightings.Weighting` instance.
        backend: kernels for the Gram and combine passes: "auto" or a name from
            :func:`emtl_kernels.available_backends`.
        mode: "speed" keeps the T task gradients (T·P extra memory) and combines them with one
            fused pass; "memory" never keeps them and runs one more backward, of Σ_i w_i L_i. For
            a weighting that reads all of G (MGDA, UPGrad, …), memory mode forms the exact G in
            one vectorised backward that reduces each parameter's T gradients into G as soon as
            autograd produces them (every op must support ``torch.vmap``); for one that reads the
            norms (and ‖Σ_i g_i‖) only, it takes them from T backward passes (O(P) extra memory).
        norm_params: a subset of ``shared_params`` (the last shared layer, say) to take the
            norms and Gram matrix over: cheaper, an approximation. The update still covers every
            shared parameter, by one more backward of Σ_i w_i L_i.
        batched_backward: compute the T task gradients in one vectorised backward
            (``is_grads_batched``) instead of T backward passes. Faster for small models; every
            op of the model must support ``torch.vmap`` (sparse gradients do not). In memory
            mode, a weighting that reads only the norms then gets the exact G from the one
            vectorised backward too, as the ones that read all of G do.
        head_gradients: what the parameters outside ``shared_params`` (the task heads) get:
            "weighted" (default, the specification's): the gradient of Σ_i w_i L_i, so head i
            learns at the rate w_i; "unweighted": the gradient of Σ_i L_i, each head its task's
            plain gradient, as LibMTL's gradient methods and TorchJD's ``mtl_backward`` give it.
        **weighting_options: options of a weighting given by name (EMTL: ``lam``, ``eps``,
            ``min_weight``; gradient-norm scaling: ``target``, ``eps``; the others: the keyword
            arguments of their ``*_weights`` function, e.g. CAGrad's ``c``).

    After :meth:`backward`, :attr:`last` holds a :class:`StepRecord`. A head whose gradient is
    sparse (``nn.Embedding(sparse=True)``) gets it as ``backward()`` gives it; a shared parameter
    with a sparse gradient is refused.

    **Skipped steps.** A step is skipped, as ``GradScaler`` skips one, when a loss or a weight
    is not finite, when the weighting reads G and a squared norm G_ii is not finite, or when a
    value the step would add to a ``.grad`` is not finite. It then adds nothing to any ``.grad``
    (parameters without one may get zeros), its weights are zero, ``last.skipped`` is True and
    ``last.skip_reasons`` says why; :meth:`optimizer_step` does not step. How each added value
    is known to be finite, with no host sync:

    - the heads' gradients, and every gradient of the extra backward of ``mode="memory"`` and
      ``norm_params``, are checked before anything is written (one read of them);
    - the fused combination Σ_i w_i g_i on the shared parameters (speed mode), in float32 and
      bfloat16, by a certificate at no cost: every G_ii finite and Σ_i |w_i|·sqrt(G_ii) at most
      half the dtype's largest value. So a task gradient whose norm is beyond float32's range
      (~1.8e19) skips the step (reason "sq_norm") for a weighting that reads G;
    - that combination in float16 (largest value 65504), by reading the values written, which
      are put back when the step is skipped (one read of them, one masked write, and a copy of
      ``.grad`` first where it already held values);
    - for a weighting that reads nothing of G (equal weighting), its one backward's gradients,
      before they are written: it is skipped only when what it would write is not finite,
      whatever the norms; in features mode, the trunk's and heads' gradients likewise.

    In float16, the check covers the sum a ``.grad`` holds after the addition; in float32 and
    bfloat16 the value added (their sum with what ``.grad`` held can overflow only beyond
    ~1.7e38). A call that raises (bad input, a custom weighting's wrong output, a sparse
    gradient on a shared parameter) raises before anything is written: ``.grad`` and the step's
    state (T, :attr:`last`) are as before.
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
        head_gradients: HeadGradients = "weighted",
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
        backends.check_backend_name(backend)
        if head_gradients not in ("weighted", "unweighted"):
            raise ValueError(f"head_gradients must be 'weighted' or 'unweighted', got {head_gradients!r}")
        if not self.reduces_over_ranks:
            _warn_if_data_parallel()
        self.backend = backend
        self.mode: Mode = mode
        self.batched_backward = batched_backward
        self.head_gradients: HeadGradients = head_gradients
        self.num_tasks: int | None = None
        self.last: StepRecord | None = None

    def backward(
        self,
        losses: Tensor | Sequence[Tensor],
        *,
        features: Tensor | Sequence[Tensor] | None = None,
        retain_graph: bool = False,
    ) -> Tensor:
        """Write the gradient of Σ_i w_i L_i into ``.grad`` and return the weights ``[T]``.

        ``losses`` is a 1-D tensor of T losses or a sequence of T scalar losses, each with a
        graph to the shared parameters; T is fixed by the first call that succeeds. A step whose
        values are not finite is skipped (see :class:`MTLStep`); a call that raises changes
        nothing.

        ``features`` (features mode, :mod:`emtl_kernels.features`): the trunk's outputs that the
        heads read, a tensor or a sequence of tensors. The weights are then computed from the
        Gram matrix G_z of the task gradients on the features (T backward passes through the
        heads only), and one backward of the trunk writes the update: about the cost of one
        backward, an approximation of the weights (the update is exactly the gradient of
        Σ_i w_i L_i for the weights used). ``mode`` and ``batched_backward`` apply to the
        passes through the heads; ``norm_params`` cannot be combined with it. :attr:`last`
        records G_z, and the norms and relative contributions from it, in features space.

        A weighting that reads no gradients (``Weighting.reads_gram`` false: equal weighting)
        runs one backward of Σ_i w_i L_i in every mode, features or not; :attr:`last` then holds
        NaN for what it did not measure (squared norms, relative contributions).
        """
        loss_list = self._checked_losses(losses)
        loss_vector = torch.stack([loss.detach() for loss in loss_list])
        if features is not None:
            feature_list = checked_features(features, self.shared_params[0].device)
            if self.norm_params is not None:
                raise ValueError("features and norm_params choose the gradients to weigh by: give one of them")
            if self.weighting.reads_gram:
                return self._commit(self._backward_through_features(loss_list, loss_vector, feature_list, retain_graph))
        leaves = graph_leaves(loss_list)
        heads = [leaf for leaf in leaves if id(leaf) not in self._shared_ids]
        if not self.weighting.reads_gram:
            if len(heads) == len(leaves):
                raise ValueError("no loss reaches any of the shared parameters")
            record = self._backward_once(loss_list, loss_vector, heads, retain_graph)
        elif self.mode == "speed" and self.norm_params is None:
            record = self._combine_task_gradients(loss_list, loss_vector, heads, retain_graph)
        else:
            record = self._backward_weighted_sum(loss_list, loss_vector, heads, retain_graph)
        return self._commit(record)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``optimizer.step()`` unless the last backward was skipped; returns whether it stepped.

        Reads the skip flag on the host, one wait per step, as ``GradScaler.step`` does. Code that
        must not wait reads ``last.skipped`` itself (a fused optimiser takes it as ``found_inf``).
        """
        if bool(self._record_of_last_call().skipped):
            return False
        optimizer.step()
        return True

    def after_optimizer_step(self, losses: Tensor | Sequence[Tensor]) -> None:
        """Hand the weighting the losses of the same batch measured after ``optimizer.step()``,
        for one that learns from the change the step made (FAMO); nothing for the others.

        ``losses``: the T losses (a 1-D tensor or a sequence of scalars; no graph needed).
        """
        self._record_of_last_call()
        if isinstance(losses, Tensor):
            loss_vector = losses.detach()
        else:
            loss_vector = torch.stack([torch.as_tensor(loss).detach() for loss in losses])
        if loss_vector.shape != (self.num_tasks,):
            raise ValueError(
                f"after_optimizer_step needs the T={self.num_tasks} losses, got shape {tuple(loss_vector.shape)}"
            )
        self.weighting.after_optimizer_step(loss_vector)

    def _record_of_last_call(self) -> StepRecord:
        if self.last is None:
            raise RuntimeError("no backward() has run on this step yet")
        return self.last

    def _commit(self, record: StepRecord) -> Tensor:
        """The call succeeded: its T is the step's from now on, its record the last."""
        self.num_tasks = record.losses.numel()
        self.last = record
        self.weighting.after_backward(record.losses, record.skipped)
        return record.weights

    # Speed mode: J is kept, the update is one fused combine pass.
    def _combine_task_gradients(self, losses, loss_vector, heads, retain_graph) -> StepRecord:
        per_task = self._task_gradients(losses, self.shared_params + heads, retain_graph)
        reached, jacobian = self._jacobian_on(per_task, self.shared_params)
        gram = self._gram(jacobian, loss_vector)
        weights = self._weights(loss_vector, gram)
        check = self._skip_check(loss_vector, gram, weights)
        head_grads = self._head_gradients(per_task, weights)
        check.require_finite(values_to_check(heads, head_grads))
        if jacobian is not None:
            outs, accumulate = grad_destinations([p for p in reached if p.numel() > 0])
            self._write_combination(jacobian, outs, accumulate, weights, gram.diagonal(), check)
        skipped = check.skipped
        give_empty_grads([p for p in reached if p.numel() == 0])
        for head, grad in zip(heads, head_grads, strict=True):
            accumulate_grad(head, grad, skipped)
        return self._record(loss_vector, gram, weights, check, gram_formed=True)

    def _write_combination(self, jacobian, outs, accumulate, weights, sq_norms, check: SkipCheck) -> None:
        """``outs (+)= Jᵀw``, and its part of the skip check: the certificate before the write, or
        the values written after it (put back when the step is skipped)."""
        if not self._reads_written_values(jacobian.dtype):
            check.require(combination_bounded(weights, sq_norms, jacobian.dtype))
            self._agree_across_ranks(check)
            weighted_combine(
                jacobian,
                torch.where(check.skipped, 0.0, weights),
                out=outs,
                accumulate=accumulate,
                backend=self.backend,
            )
            return
        backups = backups_of([out if accumulate else None for out in outs])
        weighted_combine(
            jacobian, torch.where(check.skipped, 0.0, weights), out=outs, accumulate=accumulate, backend=self.backend
        )
        check.require_finite(outs)
        self._agree_across_ranks(check)
        undo_if(check.skipped, outs, backups)

    def _reads_written_values(self, dtype: torch.dtype) -> bool:
        """Whether the combination is checked by its written values rather than the certificate."""
        return dtype == torch.float16 or not self.weighting.reads_gram

    def _agree_across_ranks(self, check: SkipCheck) -> None:
        """Make a decision that rests on this process's values the same on every rank (one process here)."""

    # The pieces of a speed-mode step, shared with the distributed step. ``per_task[i]`` holds task
    # i's gradients on the shared parameters (in order), then on the heads; None where it has none.
    def _reached(
        self, per_task: Sequence[Sequence[Tensor | None]], params: Sequence[Tensor], *, what: str | None = None
    ) -> list[int]:
        """Indices of ``params`` (the first columns of ``per_task``) some loss reaches; warns for
        each loss that reaches none, raises when no loss reaches any."""
        return self._reached_from([[g is not None for g in grads[: len(params)]] for grads in per_task], params, what)

    def _reached_from(
        self, reaches: Sequence[Sequence[bool]], params: Sequence[Tensor], what: str | None = None
    ) -> list[int]:
        """``reaches[i][k]``: whether loss i reaches ``params[k]`` (known from the graph, not from
        values); ``what`` names ``params`` in the messages (by default, which parameters they are)."""
        what = what or self._scope_name(params)
        reached = [k for k in range(len(params)) if any(row[k] for row in reaches)]
        if not reached:
            raise ValueError(f"no loss reaches any of the {what}")
        for i, row in enumerate(reaches):
            if not any(row):
                warnings.warn(
                    f"loss {i} has no path to the {what}: it keeps weight 1 and is reported in step.last.zero_gradient",
                    stacklevel=_caller_stacklevel(),
                )
        return reached

    def _jacobian_on(self, per_task, params: Sequence[Tensor]) -> tuple[list[Tensor], TaskGradients | None]:
        """The ``params`` some loss reaches, and J on those of them with elements (None if none has)."""
        reached = self._reached(per_task, params)
        sized = [k for k in reached if params[k].numel() > 0]
        _refuse_sparse(per_task, sized, params, self._scope_name(params))
        jacobian = TaskGradients(task_rows(per_task, sized, [params[k] for k in sized])) if sized else None
        return [params[k] for k in reached], jacobian

    def _gram(self, jacobian: TaskGradients | None, loss_vector: Tensor) -> Tensor:
        if jacobian is None:  # every parameter reached has no elements: no task has a gradient
            return torch.zeros(loss_vector.numel(), loss_vector.numel(), dtype=torch.float32, device=loss_vector.device)
        return task_gram(jacobian, backend=self.backend)

    def _head_gradients(self, per_task, weights: Tensor) -> list[Tensor | None]:
        """Σ_i w_i ∇L_i (Σ_i ∇L_i with ``head_gradients="unweighted"``) on each input after the
        shared parameters (the heads); None where no loss reaches one. Nothing is written."""
        return head_sums(per_task, len(self.shared_params), weights if self.head_gradients == "weighted" else None)

    # Memory mode, or norms on a subset: G or the norms, then one backward of Σ w_i L_i.
    def _backward_weighted_sum(self, losses, loss_vector, heads, retain_graph) -> StepRecord:
        scope = self.norm_params or self.shared_params
        # Unweighted heads take their gradients from the T task passes (the vectorised backward
        # reaches the shared parameters only: one backward of Σ_i L_i through the heads then);
        # weighted ones from the last.
        unweighted = self.head_gradients == "unweighted"
        task_heads = heads if unweighted else []
        if self.mode == "speed":
            per_task = self._task_gradients(losses, scope + task_heads, retain_graph=True)
            gram = self._gram(self._jacobian_on(per_task, scope)[1], loss_vector)
            head_grads = head_sums(per_task, len(scope), None)
        elif self._streams_gram:
            gram, reached = streamed_gram(losses, scope, backend=self.backend)
            self._reached_from([reached], scope)
            head_grads = self._summed_head_gradients(losses, task_heads)
        else:
            gram, head_grads = self._gram_from_norms(losses, scope, task_heads)
        weights = self._weights(loss_vector, gram)
        check = self._skip_check(loss_vector, gram, weights)
        targets = self.shared_params if unweighted else self.shared_params + heads
        weighted_loss = weighted_sum(losses, weights)
        grads = list(torch.autograd.grad(weighted_loss, targets, retain_graph=retain_graph, allow_unused=True))
        num_shared = len(self.shared_params)
        additions = grads[:num_shared] + (head_grads if unweighted else grads[num_shared:])
        self._write_checked(self.shared_params + heads, additions, check)
        return self._record(loss_vector, gram, weights, check, gram_formed=self.mode == "speed" or self._streams_gram)

    @staticmethod
    def _summed_head_gradients(losses, heads) -> list[Tensor | None]:
        """Σ_i ∇L_i on ``heads`` (None where no loss reaches one), by one backward through them."""
        if not heads:
            return []
        return list(torch.autograd.grad(sum(losses), heads, retain_graph=True, allow_unused=True))

    @property
    def _streams_gram(self) -> bool:
        """Whether memory mode forms G exactly by one vectorised backward (:mod:`.streamed_gram`),
        rather than the norms by T backward passes."""
        return self.mode == "memory" and (self.weighting.gram_use == "full" or self.batched_backward)

    def _write_checked(self, params: Sequence[Tensor], additions: Sequence[Tensor | None], check: SkipCheck) -> None:
        """``param.grad += addition`` for each pair (the shared parameters first), unless the step
        is skipped, its additions read once for the skip check before anything is written."""
        num_shared = len(self.shared_params)
        _refuse_sparse([additions], range(num_shared), self.shared_params, "shared parameters")
        check.require_finite(values_to_check(params, additions))
        skipped = check.skipped
        for param, grad in zip(params, additions, strict=True):
            accumulate_grad(param, grad, skipped)

    # Features mode: G from the gradients on the features, one backward of the trunk.
    def _backward_through_features(self, losses, loss_vector, features, retain_graph) -> StepRecord:
        heads, trunk_others = split_at_features(losses, features, self._shared_ids)
        # The graph below the features stays for the trunk's backward: these passes stop at them.
        per_task = self._task_gradients(losses, features + heads, retain_graph)
        check_every_feature_reached(per_task, len(features))
        self._reached(per_task, features, what="features")
        jacobian = feature_jacobian(per_task, features)
        gram = task_gram(jacobian, backend=self.backend)
        weights = self._weights(loss_vector, gram)
        check = self._skip_check(loss_vector, gram, weights)
        head_grads = head_sums(per_task, len(features), weights if self.head_gradients == "weighted" else None)
        cotangents = weighted_cotangents(jacobian, torch.where(check.skipped, 0.0, weights), features, self.backend)
        trunk = self.shared_params + trunk_others
        grads = torch.autograd.grad(features, trunk, cotangents, retain_graph=retain_graph, allow_unused=True)
        self._write_checked(trunk + heads, [*grads, *head_grads], check)
        return self._record(loss_vector, gram, weights, check, gram_formed=True)

    # Weightings that read no gradients: one backward of Σ w_i L_i.
    def _backward_once(self, losses, loss_vector, heads, retain_graph) -> StepRecord:
        unmeasured, weights, check = self._weights_from_losses(loss_vector)
        unweighted = self.head_gradients == "unweighted"
        # Unweighted heads need Σ_i ∇L_i, another cotangent: one more backward, through the heads only.
        summed_heads = heads if unweighted else []
        head_grads = self._summed_head_gradients(losses, summed_heads)
        check.require_finite(values_to_check(summed_heads, head_grads))
        targets = self.shared_params if unweighted else self.shared_params + heads
        backward_into_grads(weighted_sum(losses, weights), targets, check, retain_graph=retain_graph)
        skipped = check.skipped
        for head, grad in zip(summed_heads, head_grads, strict=True):
            accumulate_grad(head, grad, skipped)
        return self._record(loss_vector, unmeasured, weights, check, gram_formed=False)

    def _weights_from_losses(self, loss_vector: Tensor) -> tuple[Tensor, Tensor, SkipCheck]:
        """For a weighting that reads no gradients: the Gram matrix it did not measure (NaN), its
        weights from ``loss_vector``, and the skip check they start."""
        num_tasks = loss_vector.numel()
        unmeasured = torch.full((num_tasks, num_tasks), math.nan, dtype=torch.float32, device=loss_vector.device)
        weights = self._weights(loss_vector, unmeasured)
        return unmeasured, weights, self._skip_check(loss_vector, unmeasured, weights)

    def _weighted_sum_gradients(self, losses, weights: Tensor, heads, retain_graph) -> list[Tensor | None]:
        """The gradients of Σ_i w_i L_i on the shared parameters, then on ``heads`` (Σ_i ∇L_i there
        with ``head_gradients="unweighted"``); None where no loss reaches one. Nothing is written."""
        unweighted = self.head_gradients == "unweighted"
        # Unweighted heads need Σ_i ∇L_i, another cotangent: one more backward, through the heads only.
        head_grads = self._summed_head_gradients(losses, heads) if unweighted else []
        targets = self.shared_params if unweighted else self.shared_params + heads
        weighted_loss = weighted_sum(losses, weights)
        grads = list(torch.autograd.grad(weighted_loss, targets, retain_graph=retain_graph, allow_unused=True))
        if all(grad is None for grad in grads[: len(self.shared_params)]):
            raise ValueError("no loss reaches any of the shared parameters")
        return grads + head_grads

    def _gram_from_norms(self, losses, scope, heads) -> tuple[Tensor, list[Tensor | None]]:
        """A T×T matrix with the exact diagonal ‖g_i‖² (and, where the weighting reads it, the
        exact total ‖Σ_i g_i‖² spread over the off-diagonal entries; else NaN there), built one
        task at a time so that only one task's gradients are alive at once; and Σ_i ∇L_i on
        ``heads``, summed as the passes go."""
        num_tasks = len(losses)
        wants_total = self.weighting.gram_use == "diagonal_and_total"
        summed = [torch.zeros_like(p, dtype=torch.float32) for p in scope] if wants_total else None
        summed_heads: list[Tensor | None] = [None] * len(heads)
        norms_by_task, reaches = [], []
        for loss in losses:
            grads = torch.autograd.grad(loss, scope + heads, retain_graph=True, allow_unused=True)
            on_scope = grads[: len(scope)]
            reaches.append([g is not None for g in on_scope])
            present = [g for g in on_scope if g is not None and g.numel() > 0]
            _refuse_sparse([on_scope], range(len(scope)), scope, self._scope_name(scope))
            if present:
                norms_by_task.append(task_sq_norms(TaskGradients([present]), backend=self.backend)[0])
            else:
                norms_by_task.append(torch.zeros((), dtype=torch.float32, device=loss.device))
            if summed is not None:
                torch._foreach_add_(summed, list(zeros_for_missing(on_scope, scope)))
            summed_heads = [_added(total, g) for total, g in zip(summed_heads, grads[len(scope) :], strict=True)]
        self._reached_from(reaches, scope)
        sq_norms = torch.stack(norms_by_task)
        off_diagonal = torch.full((), math.nan, dtype=torch.float32, device=sq_norms.device)
        if summed is not None and num_tasks > 1:
            total = task_sq_norms(TaskGradients([summed]), backend=self.backend)[0]
            off_diagonal = (total - sq_norms.sum()) / (num_tasks * (num_tasks - 1))
        eye = torch.eye(num_tasks, dtype=torch.bool, device=sq_norms.device)
        return torch.where(eye, torch.diag(sq_norms), off_diagonal), summed_heads

    def _weights(self, loss_vector: Tensor, gram: Tensor) -> Tensor:
        """The weighting's ``[T]`` weights, checked before anything is allocated or written."""
        weights = self.weighting(loss_vector, gram)
        name, num_tasks = type(self.weighting).__name__, loss_vector.numel()
        if not isinstance(weights, Tensor) or weights.shape != (num_tasks,):
            got = f"shape {tuple(weights.shape)}" if isinstance(weights, Tensor) else f"a {type(weights).__name__}"
            raise ValueError(f"the weighting {name} returned {got}; a weighting returns a [T] = [{num_tasks}] tensor")
        if not weights.is_floating_point():
            raise TypeError(
                f"the weighting {name} returned weights of dtype {weights.dtype}: they must be floating point"
            )
        if weights.device != loss_vector.device:
            raise ValueError(
                f"the weighting {name} returned weights on {weights.device}, the losses are on {loss_vector.device}"
            )
        return weights.detach()

    def _skip_check(self, loss_vector: Tensor, gram: Tensor, weights: Tensor) -> SkipCheck:
        return SkipCheck(loss_vector, gram.diagonal(), weights, reads_gram=self.weighting.reads_gram)

    def _record(self, loss_vector, gram, weights, check: SkipCheck, *, gram_formed: bool) -> StepRecord:
        reasons = check.reasons
        skipped = reasons.any()
        sq_norms = gram.diagonal()
        return StepRecord(
            losses=loss_vector,
            sq_norms=sq_norms,
            gram=gram if gram_formed else None,
            relative_contributions=relative_contributions(loss_vector, gram, eps=self.weighting.contribution_eps),
            weights=torch.where(skipped, 0.0, weights),
            zero_gradient=sq_norms == 0,
            skipped=skipped,
            skip_reasons=reasons,
        )

    def _scope_name(self, params: Sequence[Tensor]) -> str:
        return "norm_params" if params is self.norm_params else "shared parameters"

    def _task_gradients(self, losses, inputs, retain_graph) -> list[tuple[Tensor | None, ...]]:
        """Per task, the gradients of its loss on ``inputs`` (None where it does not reach one)."""
        num_tasks = len(losses)
        if self.batched_backward:
            stacked = torch.stack(losses)
            eye = torch.eye(num_tasks, dtype=stacked.dtype, device=stacked.device)
            try:
                blocks = torch.autograd.grad(
                    stacked,
                    inputs,
                    grad_outputs=eye,
                    is_grads_batched=True,
                    retain_graph=retain_graph,
                    allow_unused=True,
                )
            except NotImplementedError as error:
                raise NotImplementedError(
                    "batched_backward runs the backward under torch.vmap, and an op of this model has no "
                    "batched form there (sparse gradients, as of nn.Embedding(sparse=True), have none): "
                    f"use batched_backward=False ({error})"
                ) from error
            return [tuple(None if b is None else b[i] for b in blocks) for i in range(num_tasks)]
        return [
            torch.autograd.grad(loss, inputs, retain_graph=retain_graph or i < num_tasks - 1, allow_unused=True)
            for i, loss in enumerate(losses)
        ]

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
        if self.num_tasks is not None and len(loss_list) != self.num_tasks:
            raise ValueError(f"this step was first called with T={self.num_tasks} losses, now with {len(loss_list)}")
        return loss_list


def _refuse_sparse(per_task, indices: Iterable[int], params: Sequence[Tensor], what: str) -> None:
    """Raise, before anything is written, where a shared parameter got a sparse gradient: the
    Gram and combine passes read and write dense memory."""
    for k in indices:
        if any(grads[k] is not None and grads[k].is_sparse for grads in per_task):
            raise ValueError(
                f"{what}[{k}] (shape {tuple(params[k].shape)}) gets a sparse gradient (nn.Embedding(sparse=True) "
                "or alike): a shared parameter needs dense gradients; sparse ones are supported on the task heads"
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
        if p.layout != torch.strided:
            raise ValueError(f"{what}[{k}] is a {p.layout} tensor: shared parameters must be dense")
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


def head_sums(per_task, start: int, weights: Tensor | None) -> list[Tensor | None]:
    """For each input from column ``start`` on (the heads), Σ_i w_i ∇L_i over the tasks that reach
    it (Σ_i ∇L_i when ``weights`` is None); None where none does."""
    return [
        summed_terms([(i, grads[j]) for i, grads in enumerate(per_task) if grads[j] is not None], weights)
        for j in range(start, len(per_task[0]))
    ]


def weighted_sum(losses: Sequence[Tensor], weights: Tensor) -> Tensor:
    """Σ_i w_i L_i, with a graph through the losses (the weights are constants)."""
    return sum(w * loss for w, loss in zip(weights.unbind(0), losses, strict=True))  # type: ignore[return-value]


def _added(total: Tensor | None, grad: Tensor | None) -> Tensor | None:
    if total is None or grad is None:
        return grad if total is None else total
    return total + grad
