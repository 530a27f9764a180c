"""FSDP2 for ``ModelParallelStrategy``: every decoder layer a ``fully_shard`` unit, then the rest."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from transformers.modeling_layers import GradientCheckpointingLayer

from pear_lightning.model.logprobs import separable_head


def shard_model(model: nn.Module, mesh: DeviceMesh) -> bool:
    """Shard ``model`` over the mesh's data-parallel dimension, in place.

    Decoder layers are units (transformers' ``GradientCheckpointingLayer`` is the base of every HF
    decoder layer). An untied lm_head and the rest of the decoder become units of their own, so the
    memory-lean log-prob path can call them separately; a tied head stays with the embeddings in the
    root unit, reachable only through the model's own forward.

    Returns:
        Whether the memory-lean (chunked) log-prob path can be used on the sharded model.
    """
    mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            fully_shard(module, mesh=mesh)
    parts = separable_head(model)
    separate = parts is not None and parts[1].weight is not model.get_input_embeddings().weight
    if separate:
        decoder, head = parts
        fully_shard(decoder, mesh=mesh)
        fully_shard(head, mesh=mesh, reshard_after_forward=False)  # called once per chunk: gather it once
    fully_shard(model, mesh=mesh)
    return separate
