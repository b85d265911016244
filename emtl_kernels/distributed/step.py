"""DistributedMTLStep: the multi-task step on a model trained data-parallel with torch.distributed.

Each rank holds a slice of the global batch and computes its task losses L_i^(r) (means over its
slice) and task gradients J_r. With equal slices, the global-batch losses and gradients are the
means over ranks, L = (1/W) Σ_r L^(r) and J = (1/W) Σ_r J_r, as DDP and FSDP average them.

``sync="exact"`` gives the weights and the update of one process on the global batch:
- DDP: the task gradients are copied into flat buckets (:mod:`.buckets`) and reduce-scattered,
  one collective a task a bucket, so that each rank holds Σ_r J_r on its 1/W of the columns. It
  forms the Gram partials of its shard; one all-reduce of T(T+1)/2 partials (and the T losses)
  gives G on every rank, hence the same weights; each rank combines its shard, and an all-gather
  completes the combined gradient on every rank. Task heads are averaged by one all-reduce.
- FSDP2: FSDP's own backward reduce-scatters each task's gradients into the sharded ``.grad``
  (one ``backward()`` a task); the step forms the Gram partials of the local shards, all-reduces
  them with the losses, and combines on the shards: the update stays sharded, as FSDP keeps it.

``mode="memory"`` (DDP only) never holds the task gradients: one vectorised backward produces each
shared parameter's T gradients, and each group of them, as soon as autograd has it, is
reduce-scattered (exact sync: this rank's slice of Σ_r J_r) or kept local (local sync) and reduced
into Gram partials (:mod:`emtl_kernels.streamed_gram`); one all-reduce of the partials and the
losses gives G on every rank, and DDP's own backward of Σ_i w_i L_i writes the update.

``sync="local"`` (DDP only) approximates: each rank forms G_r from its local task gradients, one
all-reduce averages the Gram matrices and the losses, every rank derives the same weights from
(mean L, mean G_r) and combines its local gradients, and DDP's own reduction averages the
combination. The update is exactly the global-batch gradient of Σ_i w_i L_i; only the weights
are approximate, since mean_r J_r J_rᵀ counts each rank's sampling noise that the mean J_r
averages away (norms come out larger, more so for smaller local batches).

A weighting that reads no gradients (``Weighting.reads_gram`` false: equal weighting and the
loss-based ones) runs one backward in every mode, as :class:`~emtl_kernels.MTLStep` does: one
all-reduce of the T losses gives their global-batch mean, hence the same weights on every rank
(in local mode too: there is no G to approximate; RLW's random draws agree where the ranks seed
its generator alike), and the wrapper's own backward of
Σ_i w_i L_i writes the update, heads included. Under DDP each rank takes its gradients of
Σ_i w_i L_i, checks them, and hands them to DDP's reduction; under FSDP2 FSDP's backward
reduce-scatters them, and the step checks the shards before it adds them to ``.grad``
(``head_gradients="unweighted"`` costs one more backward there, of Σ_i L_i, as FSDP reduces the
whole model's gradients in each; under DDP that one runs through the heads only).

Communication per step (P shared elements, H head elements, W ranks; payload, in elements;
T(T+3)/2 = the T losses and the T(T+1)/2 entries of G's upper triangle):

    plain DDP:   all-reduce P + H
    exact DDP:   reduce-scatter T·P, all-gather P, all-reduce H + T(T+3)/2
    local DDP:   all-reduce P + H (DDP's own), all-reduce T(T+3)/2, all-reduce 1 (the skip)
    memory DDP:  exact: reduce-scatter T·P, all-reduce P + H (DDP's own), all-reduce T(T+3)/2,
                 all-reduce 1 (the skip); local: the same without the reduce-scatter
    exact FSDP2: reduce-scatter of P + H_i once per task i (FSDP's own), all-reduce T(T+3)/2,
                 all-reduce 1 (the skip)
    no G read:   DDP, either sync: all-reduce P + H (DDP's own), all-reduce T (the losses),
                 all-reduce 1 (the skip); FSDP2: reduce-scatter P + H once (FSDP's own), the same two

Under ring algorithms each rank sends (W−1)/W of a reduce-scatter's or an all-gather's payload
and 2(W−1)/W of an all-reduce's: on the shared parameters exact DDP sends (T+1)/2 times what
plain DDP sends, local mode the same, and a weighting that reads no gradients T + 1 numbers more.

A step is skipped on every rank or on none (:class:`~emtl_kernels.MTLStep` says what skips one).
Exact DDP's checks read values every rank holds alike: the all-reduced losses and G, the
averaged heads, the gathered update. Local mode and FSDP2 check each rank's own values (its
combination before DDP averages it, its shards of the heads), and one all-reduce of one number
makes the decision common. So does the one-backward path of a weighting that reads no
gradients, whose checks read each rank's own gradients (the losses it checks are all-reduced).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal, cast

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

from ..autograd_graph import graph_leaves
from ..features import (
    check_every_feature_reached,
    checked_features,
    feature_jacobian,
    split_at_features,
    weighted_cotangents,
)
from ..grad_writes import (
    accumulate_grad,
    backups_of,
    give_empty_grads,
    grad_destinations,
    undo_if,
    values_to_check,
)
from ..ops import task_gram, weighted_combine
from ..skip_check import SkipCheck, combination_bounded
from ..step import HeadGradients, Mode, MTLStep, StepRecord, head_sums, task_rows, weighted_sum
from ..streamed_gram import streamed_gram
from ..task_gradients import TaskGradients
from ..weightings import Weighting
from .buckets import Bucket, fill_bucket, plan_buckets
from .collectives import Collectives, CommunicationLog
from .wrappers import data_parallel

Sync = Literal["exact", "local"]


class DistributedMTLStep(MTLStep):
    """:class:`~emtl_kernels.MTLStep` for a model trained data-parallel on torch.distributed.

    Call it on every rank, each with the losses of its own slice of the global batch (equal
    slices, losses that are means over them). The weights are the same on every rank, and every
    parameter's ``.grad`` receives the gradient of Σ_i w_i L_i averaged over the ranks, as DDP's
    ``loss.backward()`` would give (sharded, under FSDP2).

    Args:
        model: the model, wrapped by ``torch.nn.parallel.DistributedDataParallel`` or by
            ``torch.distributed.fsdp.fully_shard`` (FSDP2, one-dimensional mesh). Its process
            group is the one the step reduces over. Run its forward as usual; the step's backward
            replaces ``loss.backward()``.
        shared_params: the shared parameters θ, each one a parameter of ``model`` (for FSDP2, the
            sharded parameters, as ``model.parameters()`` yields them outside forward). Every
            other tensor the losses reach must be a parameter of ``model`` too.
        weighting, backend, batched_backward, head_gradients, **weighting_options: as for
            :class:`~emtl_kernels.MTLStep` (``batched_backward`` under DDP only).
        mode: "speed" (default) or "memory" (DDP only): the exact G of the sync without keeping
            the task gradients, for every weighting (see the module's notes).
        sync: "exact" (default): the weights and update of one process on the global batch.
            "local" (DDP only): weights from the Gram matrices averaged over ranks, zero extra
            gradient communication; an approximation.
        bucket_cap_mb: size of one task's gradients in one reduce-scatter bucket (exact DDP;
            25 MiB, as DDP's buckets). Exact mode always communicates, even under ``no_sync()``,
            except for a weighting that reads no gradients: DDP's own reduction writes that update.

    After :meth:`backward`, :attr:`last` holds the :class:`~emtl_kernels.StepRecord` (the same on
    every rank: global losses and Gram matrix) and :attr:`communication` the
    :class:`~emtl_kernels.CommunicationLog` of the collectives the step issued (the
    wrapper's own reductions not included).

    On the first call every rank checks with one small all-gather that all agree on T and on the
    shared parameters, and raises if not. Later, a rank that raises alone leaves the others
    waiting in a collective until the process group's ``timeout`` ends them.
    """

    reduces_over_ranks = True

    def __init__(
        self,
        model: nn.Module,
        shared_params: Iterable[Tensor],
        weighting: str | Weighting = "emtl",
        *,
        sync: Sync = "exact",
        mode: Mode = "speed",
        backend: str = "auto",
        batched_backward: bool = False,
        head_gradients: HeadGradients = "weighted",
        bucket_cap_mb: float = 25.0,
        **weighting_options,
    ):
        self.data_parallel = data_parallel(model)
        if "norm_params" in weighting_options:
            raise ValueError("norm_params: the distributed step takes the norms over every shared parameter")
        if sync not in ("exact", "local"):
            raise ValueError(f"sync must be 'exact' or 'local', got {sync!r}")
        if self.data_parallel.kind == "fsdp" and (sync == "local" or batched_backward):
            raise ValueError(
                "under fully_shard the step runs FSDP's own backward once a task, which reduce-scatters "
                "each task's gradients: sync='exact' only, without batched_backward"
            )
        if self.data_parallel.kind == "fsdp" and mode == "memory":
            raise ValueError("under fully_shard the step keeps each task's sharded gradients: mode='speed' only")
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb!r}")
        super().__init__(
            shared_params,
            weighting,
            backend=backend,
            mode=mode,
            batched_backward=batched_backward,
            head_gradients=head_gradients,
            **weighting_options,
        )
        self.data_parallel.check_covers(self.shared_params, "shared_params")
        self.sync: Sync = sync
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self._collectives = Collectives(self.data_parallel.group)
        self.communication: CommunicationLog | None = None

    def backward(
        self,
        losses: Tensor | Sequence[Tensor],
        *,
        features: Tensor | Sequence[Tensor] | None = None,
        retain_graph: bool = False,
    ) -> Tensor:
        """Write the rank-averaged gradient of Σ_i w_i L_i into ``.grad``; return the weights ``[T]``.

        ``losses`` are this rank's T losses, as for :meth:`MTLStep.backward`. Every rank must call
        it, with the same T. A step is skipped on every rank or on none: the checks read values
        every rank holds alike (reduced or gathered), or, where they read this rank's own values
        (local mode, FSDP2), the ranks agree by one all-reduce of one number.

        ``features`` (DDP only): this rank's features, as for :meth:`MTLStep.backward`. Each rank
        holds the gradients on its own samples' features, so the global J_z is the ranks' blocks
        side by side and has no cross-rank terms: one all-reduce of the Gram partials gives the
        exact G_z (``sync="exact"``: Σ_r G_z^(r) / W², as for a global loss that is the mean of the
        ranks'), or their mean (``sync="local"``: Σ_r G_z^(r) / W, W times the exact one, as the
        local mode of the exact step counts each rank's batch). Either way the communication is
        plain DDP's plus one all-reduce of T(T+3)/2 numbers and one of one number (the skip): DDP's
        own backward of the trunk and heads writes the update. The skip check reads the losses,
        G_z, the weights, the heads' gradients and the cotangents, and then the trunk's
        gradients DDP wrote (alike on every rank), which a skip puts back as they were.

        A weighting that draws at random (PCGrad, GradVac, RLW) must draw alike on every rank: the
        first call checks that the ranks give it the same seed, and where it was given none, every
        rank takes one that rank 0 draws from its default generator.
        """
        first_call = self.num_tasks is None
        loss_list = self._checked_losses(losses)
        self.communication = self._collectives.start_step()
        if first_call:
            self._check_ranks_agree(len(loss_list))
        loss_vector = torch.stack([loss.detach() for loss in loss_list])
        if features is not None:
            feature_list = checked_features(features, self.shared_params[0].device)
            if self.data_parallel.kind == "fsdp":
                raise ValueError(
                    "features mode runs under DistributedDataParallel only: under fully_shard, pass no features"
                )
            if self.weighting.reads_gram:
                return self._commit(
                    self._through_features_replicated(loss_list, loss_vector, feature_list, retain_graph)
                )
        if self.data_parallel.kind == "fsdp":
            if not self.weighting.reads_gram:
                return self._commit(self._backward_once_sharded(loss_list, loss_vector, retain_graph))
            return self._commit(self._exact_sharded(loss_list, loss_vector, retain_graph))
        heads = [leaf for leaf in graph_leaves(loss_list) if id(leaf) not in self._shared_ids]
        self.data_parallel.check_covers(heads, "the task-specific tensors the losses reach")
        if not self.weighting.reads_gram:
            return self._commit(self._backward_once_replicated(loss_list, loss_vector, heads, retain_graph))
        if self.mode == "memory":
            return self._commit(self._memory_replicated(loss_list, loss_vector, heads, retain_graph))
        per_task = self._task_gradients(loss_list, self.shared_params + heads, retain_graph)
        self._refuse_sparse_heads(heads, per_task)
        reached, jacobian = self._jacobian_on(per_task, self.shared_params)
        if jacobian is None:
            raise ValueError("every shared parameter the losses reach has no elements: nothing to balance")
        sized = [p for p in reached if p.numel() > 0]
        if self.sync == "exact":
            record = self._exact_replicated(jacobian, sized, loss_vector, heads, per_task)
        else:
            record = self._local_replicated(jacobian, sized, loss_vector, heads, per_task)
        give_empty_grads([p for p in reached if p.numel() == 0])
        return self._commit(record)

    def _check_ranks_agree(self, num_tasks: int) -> None:
        """On the first call: raise unless every rank has the same T, shared parameters and, for a
        weighting that draws, seed; where it was given none, every rank takes rank 0's draw of
        one, so that the ranks draw alike (one all-gather, read on the host)."""
        source = self.weighting.random_source()
        seeded = source is not None and source.seed is not None
        seed = source.seed % 2**63 if source is not None and source.seed is not None else 0
        # Every rank draws, so that the default generators' streams stay alike across ranks.
        proposal = int(torch.randint(2**62, ())) if source is not None and not seeded else 0
        shape = [num_tasks, len(self.shared_params), sum(p.numel() for p in self.shared_params), seeded, seed]
        table = self._collectives.gathered_rows([*shape, proposal], self.shared_params[0].device)
        if any(row[:-1] != table[0][:-1] for row in table):
            detail = "; ".join(
                f"rank {r}: T={t}, {k} shared tensors, P={p}" + (f", seed {seed}" if given else "")
                for r, (t, k, p, given, seed, _) in enumerate(table)
            )
            raise ValueError(
                f"ranks disagree on the tasks, the shared parameters or the weighting's seed ({detail}): every "
                "rank must build the step on the same shared parameters and weighting and call backward with the "
                "same T losses"
            )
        if source is not None and not seeded:
            source.adopt(table[0][-1])

    def _refuse_sparse_heads(self, heads: list[Tensor], per_task, offset: int | None = None) -> None:
        """Raise where one of ``heads`` (the parameters DDP reduces) gets a sparse gradient; their
        columns of ``per_task`` start at ``offset`` (after the shared parameters by default)."""
        names = {id(p): name for name, p in self.data_parallel.module.named_parameters()}
        offset = len(self.shared_params) if offset is None else offset
        for j, head in enumerate(heads):
            if any(grads[offset + j] is not None and grads[offset + j].is_sparse for grads in per_task):
                raise ValueError(
                    f"parameter {names.get(id(head), tuple(head.shape))!r} gets a sparse gradient: the distributed "
                    "step reduces dense gradients only (use nn.Embedding(sparse=False))"
                )

    def _agree_across_ranks(self, check: SkipCheck) -> None:
        if self.data_parallel.kind == "fsdp" or self.sync == "local":
            check.require(self._collectives.all_true(check.update_finite))

    # DDP, exact: reduce-scatter J, Gram partials of the shard, all-reduce them, all-gather g.
    def _exact_replicated(self, jacobian, targets, loss_vector, heads, per_task) -> StepRecord:
        comm, world = self._collectives, self._collectives.world_size
        element_size = torch.finfo(jacobian.dtype).bits // 8
        buckets = plan_buckets(jacobian.sizes, world, max(1, self.bucket_cap_bytes // element_size))
        summed = self._reduce_scatter_buckets(jacobian, buckets)
        loss_sum, gram_sum = comm.sum_losses_and_gram(loss_vector, task_gram(summed, backend=self.backend))
        # The shards hold Σ_r J_r = W·J: the 1/W goes into G and into the weights, not over J.
        losses, gram = loss_sum / world, gram_sum / world**2
        weights = self._weights(losses, gram)
        check = self._skip_check(losses, gram, weights)
        # Every value the checks read here is reduced or gathered: the same on every rank.
        head_grads = self._averaged_over_ranks(self._head_gradients(per_task, weights))
        check.require_finite(values_to_check(heads, head_grads))
        reads_written = self._reads_written_values(jacobian.dtype)
        if not reads_written:
            check.require(combination_bounded(weights, gram.diagonal(), jacobian.dtype))
        shard_update = weighted_combine(summed, torch.where(check.skipped, 0.0, weights) / world, backend=self.backend)
        gathered = [shard.new_empty(bucket.padded) for shard, bucket in zip(shard_update, buckets, strict=True)]
        for work in [
            comm.all_gather(full, shard, async_op=True) for full, shard in zip(gathered, shard_update, strict=True)
        ]:
            work.wait()
        pieces = {
            k: piece
            for bucket, full in zip(buckets, gathered, strict=True)
            for k, piece in zip(bucket.indices, bucket.pieces(full), strict=True)
        }
        additions = [pieces[k].view_as(target) for k, target in enumerate(targets)]
        if reads_written:
            check.require_finite(values_to_check(targets, additions))
        skipped = check.skipped
        outs, accumulate = grad_destinations(targets)
        for out, addition in zip(outs, additions, strict=True):
            if reads_written:
                addition.masked_fill_(skipped, 0)
            if accumulate:
                out.add_(addition)
            else:
                out.copy_(addition)
        for head, grad in zip(heads, head_grads, strict=True):
            accumulate_grad(head, grad, skipped)
        return self._record(losses, gram, weights, check, gram_formed=True)

    def _reduce_scatter_buckets(self, jacobian: TaskGradients, buckets: list[Bucket]) -> TaskGradients:
        """Σ_r J_r on this rank's slice of every bucket (one piece a bucket). A bucket is sent as
        soon as it is filled, so that filling the next overlaps its communication."""
        comm, num_tasks = self._collectives, jacobian.num_tasks
        buffers, shards, works = [], [], []
        for bucket in buckets:
            buffers.append(fill_bucket(bucket, jacobian))
            shards.append(buffers[-1].new_empty(num_tasks, bucket.padded // comm.world_size))
            works += [comm.reduce_scatter_sum(shards[-1][i], buffers[-1][i], async_op=True) for i in range(num_tasks)]
        for work in works:
            work.wait()
        return TaskGradients([[shard[i] for shard in shards] for i in range(num_tasks)])

    def _averaged_over_ranks(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        """The heads' gradients averaged over ranks, by one all-reduce a dtype (in a fixed order,
        the same on every rank); nothing is written."""
        averaged = list(grads)
        for dtype in sorted({grad.dtype for grad in grads if grad is not None}, key=str):
            group = [j for j, grad in enumerate(grads) if grad is not None and grad.dtype == dtype]
            # The collective needs one contiguous buffer: the heads' gradients are copied into it.
            flat = torch.cat([cast(Tensor, grads[j]).reshape(-1) for j in group])
            self._collectives.all_reduce_sum(flat)
            flat /= self._collectives.world_size
            for j, piece in zip(group, flat.split([cast(Tensor, grads[j]).numel() for j in group]), strict=True):
                averaged[j] = piece.view_as(cast(Tensor, grads[j]))
        return averaged

    # DDP, local: the mean of the local Gram matrices, then DDP's own reduction of the combination.
    def _local_replicated(self, jacobian, targets, loss_vector, heads, per_task) -> StepRecord:
        world = self._collectives.world_size
        local_gram = task_gram(jacobian, backend=self.backend)
        loss_sum, gram_sum = self._collectives.sum_losses_and_gram(loss_vector, local_gram)
        losses, gram = loss_sum / world, gram_sum / world
        weights = self._weights(losses, gram)
        check = self._skip_check(losses, gram, weights)
        head_grads = self._head_gradients(per_task, weights)
        check.require_finite(head_grads)
        if self._reads_written_values(jacobian.dtype):
            combined = weighted_combine(jacobian, weights, backend=self.backend)
            check.require_finite(combined)
            self._agree_across_ranks(check)
            for piece in combined:
                piece.masked_fill_(check.skipped, 0)
        else:
            # A rank's G_ii is at most W times their mean, and DDP adds up the W ranks' combinations.
            sq_norms_bound = gram.diagonal() * world
            check.require(combination_bounded(weights, sq_norms_bound, jacobian.dtype, copies=world))
            self._agree_across_ranks(check)
            combined = weighted_combine(jacobian, torch.where(check.skipped, 0.0, weights), backend=self.backend)
        grads = [g.view_as(p) for g, p in zip(combined, targets, strict=True)]
        _backward_by_ddp([*targets, *heads], [*grads, *_unless(check.skipped, head_grads)], retain_graph=False)
        return self._record(losses, gram, weights, check, gram_formed=True)

    # DDP, features mode: G_z from the ranks' Gram partials, DDP's own backward of the trunk.
    def _through_features_replicated(self, loss_list, loss_vector, features, retain_graph) -> StepRecord:
        comm = self._collectives
        heads, trunk_others = split_at_features(loss_list, features, self._shared_ids)
        self.data_parallel.check_covers(heads + trunk_others, "the task-specific tensors the losses reach")
        per_task = self._task_gradients(loss_list, features + heads, retain_graph)
        self._refuse_sparse_heads(heads, per_task, offset=len(features))
        check_every_feature_reached(per_task, len(features))
        self._reached(per_task, features, what="features")
        jacobian = feature_jacobian(per_task, features)
        loss_sum, gram_sum = comm.sum_losses_and_gram(loss_vector, task_gram(jacobian, backend=self.backend))
        world = comm.world_size
        losses = loss_sum / world
        gram = gram_sum / (world**2 if self.sync == "exact" else world)
        weights = self._weights(losses, gram)
        check = self._skip_check(losses, gram, weights)
        head_grads = head_sums(per_task, len(features), weights if self.head_gradients == "weighted" else None)
        check.require_finite(head_grads)
        cotangents = weighted_cotangents(jacobian, torch.where(check.skipped, 0.0, weights), features, self.backend)
        check.require_finite(cotangents)
        check.require(comm.all_true(check.update_finite))
        additions = _unless(check.skipped, [*cotangents, *head_grads])
        trunk = self.shared_params + trunk_others
        backups = backups_of([p.grad for p in trunk + heads])
        _backward_by_ddp([*features, *heads], additions, retain_graph=retain_graph)
        # The trunk's gradients exist only now, averaged by DDP: the same on every rank, so is the
        # check; finite cotangents can still meet an infinite derivative below the features.
        check.require_finite([p.grad for p in trunk])
        undo_if(check.skipped, [p.grad for p in trunk + heads], backups)
        return self._record(losses, gram, weights, check, gram_formed=True)

    # FSDP2, exact: FSDP reduce-scatters each task's gradients; Gram partials of the local shards.
    def _exact_sharded(self, loss_list: list[Tensor], loss_vector: Tensor, retain_graph: bool) -> StepRecord:
        comm = self._collectives
        heads = [p for p in self.data_parallel.params if id(p) not in self._shared_ids]
        per_task = self._sharded_task_gradients(loss_list, self.shared_params + heads, retain_graph)
        reached = self._reached(per_task, self.shared_params)
        local = [_local(p) for p in self.shared_params]
        held = [k for k in reached if local[k].numel() > 0]  # with few rows, a rank's shard may be empty
        shard = TaskGradients(task_rows(per_task, held, [local[k] for k in held])) if held else None
        if shard is None:
            gram_partial = torch.zeros(len(loss_list), len(loss_list), dtype=torch.float32, device=loss_vector.device)
        else:
            gram_partial = task_gram(shard, backend=self.backend)
        loss_sum, gram = comm.sum_losses_and_gram(loss_vector, gram_partial)
        # FSDP's reduce-scatter already averaged the gradients over ranks: G needs no scaling.
        losses = loss_sum / comm.world_size
        weights = self._weights(losses, gram)
        check = self._skip_check(losses, gram, weights)
        head_grads = self._head_gradients(per_task, weights)
        check.require_finite(head_grads)
        grads, accumulate = grad_destinations([self.shared_params[k] for k in reached])
        if shard is None:
            self._agree_across_ranks(check)
        else:
            outs = [_local(grad) for grad, k in zip(grads, reached, strict=True) if k in held]
            self._write_combination(shard, outs, accumulate, weights, gram.diagonal(), check)
        _add_to_shards(heads, head_grads, check.skipped)
        return self._record(losses, gram, weights, check, gram_formed=True)

    # Weightings that read no gradients: weights from the ranks' mean losses, one backward.
    def _mean_losses(self, loss_vector: Tensor) -> Tensor:
        """The global-batch losses, the mean of the ranks' (one all-reduce of T numbers)."""
        self._collectives.all_reduce_sum(loss_vector)
        return loss_vector / self._collectives.world_size

    def _backward_once_replicated(self, loss_list, loss_vector, heads, retain_graph) -> StepRecord:
        """DDP, exact and local mode alike: the weights read only the mean losses, the same on
        every rank, so DDP's own reduction of this rank's gradients of Σ_i w_i L_i is the update."""
        losses = self._mean_losses(loss_vector)
        unmeasured, weights, check = self._weights_from_losses(losses)
        self._weighted_sum_by_ddp(loss_list, weights, check, heads, retain_graph)
        return self._record(losses, unmeasured, weights, check, gram_formed=False)

    def _weighted_sum_by_ddp(self, loss_list, weights: Tensor, check: SkipCheck, heads, retain_graph) -> None:
        """This rank's gradients of Σ_i w_i L_i, checked, handed to DDP's own reduction."""
        grads = self._weighted_sum_gradients(loss_list, weights, heads, retain_graph)
        targets = self.shared_params + heads
        self._refuse_sparse_heads(targets, [grads], offset=0)
        # Each rank reads its own gradients: a non-finite one on any rank skips the step on all.
        check.require_finite(grads)
        check.require(self._collectives.all_true(check.update_finite))
        _backward_by_ddp(targets, _unless(check.skipped, grads), retain_graph=False)

    # DDP, memory mode: G streamed from one vectorised backward, then DDP's own backward of Σ w_i L_i.
    def _memory_replicated(self, loss_list, loss_vector, heads, retain_graph) -> StepRecord:
        """Exact sync: each group of pending blocks is reduce-scattered, so that the Gram pass reads
        this rank's slice of Σ_r J_r and one all-reduce of the partials gives W²·G; local sync:
        each rank's own G_r, averaged by that all-reduce."""
        comm, world = self._collectives, self._collectives.world_size
        exact = self.sync == "exact"
        gathering = self._summed_shard if exact else TaskGradients.from_blocks
        gram_partial, reached = streamed_gram(loss_list, self.shared_params, backend=self.backend, gathering=gathering)
        self._reached_from([reached], self.shared_params)
        loss_sum, gram_sum = comm.sum_losses_and_gram(loss_vector, gram_partial)
        losses, gram = loss_sum / world, gram_sum / (world**2 if exact else world)
        weights = self._weights(losses, gram)
        check = self._skip_check(losses, gram, weights)
        self._weighted_sum_by_ddp(loss_list, weights, check, heads, retain_graph)
        return self._record(losses, gram, weights, check, gram_formed=True)

    def _summed_shard(self, blocks: list[Tensor]) -> TaskGradients:
        """Σ_r of the ranks' ``[T, *shape]`` blocks on this rank's slice of them (one bucket)."""
        grads = TaskGradients.from_blocks(blocks)
        bucket = plan_buckets(grads.sizes, self._collectives.world_size, grads.numel)[0]
        return self._reduce_scatter_buckets(grads, [bucket])

    def _backward_once_sharded(self, loss_list, loss_vector, retain_graph) -> StepRecord:
        """FSDP2: FSDP's own backward of Σ_i w_i L_i reduce-scatters the update into the shards,
        which are checked before they are added (unweighted heads: one more backward, of Σ_i L_i,
        whose heads' gradients are kept: FSDP runs it through the whole model)."""
        losses = self._mean_losses(loss_vector)
        unmeasured, weights, check = self._weights_from_losses(losses)
        heads = [p for p in self.data_parallel.params if id(p) not in self._shared_ids]
        sums = [weighted_sum(loss_list, weights)]
        if self.head_gradients == "unweighted" and heads:
            sums.append(sum(loss_list))
        passes = self._sharded_task_gradients(sums, self.shared_params + heads, retain_graph)
        num_shared = len(self.shared_params)
        grads = [*passes[0][:num_shared], *passes[-1][num_shared:]]
        if all(grad is None for grad in grads[:num_shared]):
            raise ValueError("no loss reaches any of the shared parameters")
        check.require_finite(grads)
        check.require(self._collectives.all_true(check.update_finite))
        _add_to_shards(self.shared_params + heads, grads, check.skipped)
        return self._record(losses, unmeasured, weights, check, gram_formed=False)

    def _sharded_task_gradients(self, loss_list, params, retain_graph) -> list[tuple[Tensor | None, ...]]:
        """Per task, this rank's shard of its gradients on ``params`` as FSDP's own backward leaves
        them (reduce-scattered, averaged over ranks); None where the task has none. The ``.grad``
        the parameters held before is put back."""
        leaves = graph_leaves(loss_list)
        leaf_grads = [_grad_state(leaf) for leaf in leaves]
        saved = [p.grad for p in params]
        per_task = []
        fsdp_module = cast("FSDPModule", self.data_parallel.module)
        try:
            for p in params:
                p.grad = None
            for i, loss in enumerate(loss_list):
                last = i == len(loss_list) - 1
                # Keep the parameters gathered from one task's backward to the next, not T all-gathers.
                fsdp_module.set_reshard_after_backward(last)
                loss.backward(retain_graph=retain_graph or not last)
                per_task.append(tuple(None if p.grad is None else _local(p.grad) for p in params))
                for p in params:
                    p.grad = None
                # FSDP takes the gradient it reduces off its leaves; a leaf that kept one was not reduced.
                kept = [
                    tuple(leaf.shape)
                    for leaf, state in zip(leaves, leaf_grads, strict=True)
                    if not _same_grad(leaf, state)
                ]
                if kept:
                    raise ValueError(
                        f"tensors of shapes {kept} got a gradient that fully_shard did not reduce: every "
                        "tensor the losses reach must be a parameter of the fully_shard model, and "
                        "gradient sync must be on (set_requires_gradient_sync(True))"
                    )
        finally:
            fsdp_module.set_reshard_after_backward(True)
            for p, grad in zip(params, saved, strict=True):
                p.grad = grad
        return per_task


def _backward_by_ddp(outputs: Sequence[Tensor], grads: Sequence[Tensor | None], *, retain_graph: bool) -> None:
    """One backward of ``outputs`` (parameters, or tensors computed from them) with cotangents
    ``grads`` (None: left out), through DDP's hooks.

    DDP reduces in the hooks autograd runs when it accumulates into .grad. A backward through
    identity views of the parameters hands it their gradients just as loss.backward() would: DDP
    averages them in its buckets (with any communication hook) and adds them to .grad.
    """
    pairs = [(output, grad) for output, grad in zip(outputs, grads, strict=True) if grad is not None]
    with torch.enable_grad():
        torch.autograd.backward(
            [output.view_as(output) if output.is_leaf else output for output, _ in pairs],
            [grad for _, grad in pairs],
            retain_graph=retain_graph,
        )


def _unless(skipped: Tensor, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
    """``grads``, zeros where the step is skipped."""
    return [None if grad is None else torch.where(skipped, 0.0, grad) for grad in grads]


def _add_to_shards(params: Sequence[Tensor], grads: Sequence[Tensor | None], skipped: Tensor) -> None:
    """Add each gradient shard to its parameter's local ``.grad`` shard (zeros first where it has
    none), nothing where it is None; zeros when the step is skipped."""
    for param, grad in zip(params, grads, strict=True):
        if grad is not None:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            _local(param.grad).add_(torch.where(skipped, 0.0, grad))


def _local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor, sharing its storage."""
    return cast("DTensor", tensor).to_local().detach()


def _grad_state(leaf: Tensor) -> tuple[Tensor | None, int]:
    return leaf.grad, -1 if leaf.grad is None else leaf.grad._version


def _same_grad(leaf: Tensor, state: tuple[Tensor | None, int]) -> bool:
    grad, version = state
    return leaf.grad is grad and (grad is None or grad._version == version)
