"""The planner's ZeRO terms: model states by DeepSpeed's estimators, communication buckets, and the
parameters ZeRO-3 keeps whole on every rank (``stage3_param_persistence_threshold``).

Split out of :mod:`pipeline.training.plan` (which uses them in ``estimate``); the sizes they read
are those of the resolved DeepSpeed JSON (:func:`pipeline.training.ds_config.resolve_for_recipe`),
so what the planner counts is what the run gets, whatever filled the keys (the pipeline's
``"auto"`` rule, a number in the JSON, or ``deepspeed.overrides``).
"""

from __future__ import annotations

import sys
from typing import Any

from pipeline.training.ds_config import zero_stage

# ``f`` is a ``pipeline.training.plan.ModelFacts`` and ``target`` a ``plan.Target`` below; typed Any because plan
# imports this module (an import back, even for the type checker only, would be a cycle)
ModelFacts = Target = Any

DS_ADDITIONAL_BUFFER_FACTOR = 1.5
"""DeepSpeed's own ``additional_buffer_factor`` for the CPU side of its estimators (kept as is)."""
DS_PERSISTENCE_THRESHOLD = 100_000
"""DeepSpeed's default ``stage3_param_persistence_threshold`` (elements; 0.19.8), used when the JSON has none."""


def model_states(f: ModelFacts, stage: int, off_opt: str, off_param: str, precision: str, target: Target) -> tuple[int, int, int]:
    """``(device bytes per rank, host bytes per node, NVMe bytes per node)`` for parameters,
    gradients and optimizer states, from DeepSpeed's estimators (16-bit) adjusted for fp32.

    DeepSpeed's ZeRO-3 estimator returns host memory per node (its ``1/num_nodes`` factor); its
    ZeRO-1/2 one returns a per-node figure without offload (``4N`` per GPU of the node) but a
    whole-job total with optimizer offload, which is converted here."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n, big, g, nodes, dp = f.n_params, f.largest_layer, target.gpus_per_node, target.nodes, target.world
    fp32 = precision == "fp32"
    kw = dict(num_gpus_per_node=g, num_nodes=nodes, additional_buffer_factor=DS_ADDITIONAL_BUFFER_FACTOR)
    if stage == 0:  # no DeepSpeed estimator: every rank keeps weights, gradients, master and Adam moments
        return (16 if fp32 else 20) * n, int(4 * n * g * DS_ADDITIONAL_BUFFER_FACTOR), 0
    if stage in (1, 2):
        cpu, dev = estimate_zero2_model_states_mem_needs(n, cpu_offload=off_opt != "none", **kw)
        if off_opt != "none":
            # DeepSpeed's ZeRO-2 offload figure, n * max(4 * all GPUs, 16) * 1.5, is the whole job's host
            # memory (every rank's 4-byte loading copy; all of the fp32 master, gradient and Adam partitions),
            # not a node's: it grew with the node count. A node holds its own ranks' loading copies or its
            # 1/nodes share of the 16 bytes, whichever is larger: the per-node form DeepSpeed's ZeRO-3
            # estimator uses (max(4 * gpus_per_node, 16 / nodes)); equal to DeepSpeed's on one node.
            cpu = int(n * max(4 * g, 16 / nodes) * DS_ADDITIONAL_BUFFER_FACTOR)
        if off_opt == "none":
            # DeepSpeed counts 2 (16-bit weights) + 18/dp (2 grad16 + 4 grad32 + 4 master + 8 Adam) bytes;
            # fp32: 4-byte weights, and the partition holds 4 grad + 4 master + 8 Adam.
            if fp32:
                dev = 4 * n + 16 * n // dp
            if stage == 1:  # ZeRO-1 keeps the full gradients until the step, ZeRO-2 only its partition
                dev += (4 if fp32 else 2) * n - (4 if fp32 else 2) * n // dp
        elif fp32:
            dev = 4 * n  # the fp32 weights; gradients go straight to the host buffers
        return int(dev), int(cpu), 0
    # stage 3 (zero_init: the pipeline builds and loads models partitioned)
    cpu, dev, _ = estimate_zero3_model_states_mem_needs(
        n, big, cpu_offload=off_opt != "none", cpu_offload_params=off_param != "none", zero_init=True, **kw)
    if fp32:
        dev += 4 * big  # the gathered layer and its gradient in 4 bytes, not 2
        if off_opt == "none":
            dev += 2 * n // dp  # 4-byte parameter partition beside the fp32 master (DeepSpeed counts 2)
        elif off_param == "none":
            dev += 2 * n // dp
        if off_param != "none":
            cpu += int(2 * n / nodes * DS_ADDITIONAL_BUFFER_FACTOR)
    nvme = 0
    if "nvme" in (off_opt, off_param):  # the states live on disk; the host keeps swap buffers only
        nvme = int(((16 if off_opt == "nvme" else 0) + ((4 if fp32 else 2) if off_param == "nvme" else 0)) * n / nodes)
        cpu = int(cpu * 0.25)  # pinned swap buffers and the current sub-group, not the states
    return int(dev), int(cpu), nvme


def buffers(ds: dict, f: ModelFacts, precision: str, on_gpu: bool) -> int:
    """DeepSpeed communication buckets, sizes (elements) from the resolved JSON.

    DeepSpeed allocates its gradient-reduction buckets at their full configured size
    (``torch.empty``, two of them for ZeRO-1/2 with ``overlap_comm``): on a GPU that memory is
    taken whatever the model size. On CPU ranks untouched pages cost no RAM, so only what a
    model of ``n_params`` fills counts. Gather buffers are allocated as needed (capped at the model).
    """
    e = 4 if precision == "fp32" else 2
    z = ds.get("zero_optimization") or {}
    n = f.n_params
    stage = zero_stage(ds)
    if stage == 0:
        return e * min(int(ds.get("allreduce_bucket_size", 500_000_000)), n)  # flattened gradient bucket
    reduce = int(z.get("reduce_bucket_size", 500_000_000))
    reduce = reduce if on_gpu else min(reduce, n)
    if stage in (1, 2):
        gather = min(int(z.get("allgather_bucket_size", 500_000_000)), n)
        return e * (reduce * (2 if z.get("overlap_comm") and on_gpu else 1) + gather)
    prefetch = min(int(z.get("stage3_prefetch_bucket_size", 50_000_000)), n)
    if not on_gpu:
        # measured on 2 CPU ranks (hidden 512, 26.2M parameters; docs/deepspeed.md): the rule's bucket
        # (the model's 100 MiB of gradients) against a 1 MiB one added 204 MiB to the peak without
        # offload and 281 MiB with it: about the filled bucket twice (which copy was not traced)
        reduce *= 2
    return e * (reduce + prefetch)


def persistent_elements(f: ModelFacts, ds: dict) -> int:
    """Elements of the parameters ZeRO-3 keeps whole on every rank (0 below stage 3).

    DeepSpeed marks a parameter persistent when it has at most ``stage3_param_persistence_threshold``
    elements, walking ``named_parameters()`` in order while the persistent total stays within
    ``stage3_model_persistence_threshold`` (``DeepSpeedZeRoOffload.mark_persistent_parameters``);
    such a parameter is never released after a forward, and its partition stays on the device even
    with parameter offload. Counted from the model's parameter sizes (``ModelFacts.param_sizes``);
    facts without them (made by hand) count the norms: ``2·layers + 1`` vectors of ``hidden``."""
    if zero_stage(ds) != 3:
        return 0
    z = ds.get("zero_optimization") or {}
    t = int(z.get("stage3_param_persistence_threshold", DS_PERSISTENCE_THRESHOLD))
    cap = int(z.get("stage3_model_persistence_threshold", sys.maxsize))
    sizes = f.param_sizes or (f.hidden,) * (2 * f.layers + 1)
    total = 0
    for numel in sizes:
        if numel <= t and numel + total <= cap:
            total += numel
    return total


def persistent_bytes(f: ModelFacts, ds: dict, precision: str, world: int) -> int:
    """Device bytes per rank of the persistent parameters beyond what DeepSpeed's ZeRO-3 estimator
    counts (a ``1/dp`` partition of every parameter): the whole parameter on every rank, and with
    parameter offload also its partition, which stays on the device."""
    p = persistent_elements(f, ds)
    if not p:
        return 0
    e = 4 if precision == "fp32" else 2
    off_param = str(((ds.get("zero_optimization") or {}).get("offload_param") or {}).get("device", "none") or "none")
    return e * p + (e * p // max(world, 1) if off_param != "none" else 0)
