"""FSDP2 for the stage chain: the student sharded by accelerate, the teacher sharded here.

Under ``accelerate launch`` with an FSDP config of ``fsdp_version: 2`` (docs/distributed.md):

- **Student.** accelerate's ``prepare`` applies ``fully_shard`` to every decoder/encoder layer
  (the classes in the model's ``_no_split_modules``) and to the root, which holds the rest:
  embeddings, connector (TAF post-connector included), final norm and ``lm_head``. The root
  is not resharded after the forward, so the losses read the gathered ``lm_head`` weight
  directly and its gradient is reduce-scattered once, at the end of the backward: one
  all-gather of ``lm_head`` per step.
- **Teacher.** Sharded here, in inference mode, with its own wrap policy (its own layer
  classes): no optimizer, no gradients. Its root group is ``teacher.model`` together with
  ``teacher.lm_head`` (one group), so the forward gathers ``lm_head`` with the embeddings;
  :func:`teacher_step` reshards it once the losses are computed: one all-gather per step.
- **End of a stage.** :func:`consolidated` gathers the full state dict on the main process
  (accelerate's ``get_state_dict``) and loads it into a meta-device :func:`skeleton` of the
  stage's module taken before sharding; the trainer merges LoRA into it and saves a plain
  ``save_pretrained`` folder, which every process then reloads for the next stage.

Under an accelerate config of ``distributed_type: DEEPSPEED`` (ZeRO-2 or ZeRO-3):

- **Student.** accelerate's ``prepare`` builds a ``DeepSpeedEngine``: ZeRO-2 partitions the
  optimizer states and gradients, ZeRO-3 the parameters too. The models always load whole
  (``zero3_init_flag: false``; true is refused): ``from_pretrained``, TAF and LoRA see whole
  weights, and the engine partitions the student when it is prepared.
- **Teacher.** Replicated (DeepSpeed shards only what is prepared; the teacher has nothing to
  optimise).
- **lm_head under ZeRO-3.** The fused losses read the student's frozen ``lm_head`` weight
  outside any forward, where ZeRO-3 holds an empty partition: :func:`zero3_head_step` gathers
  it once per step. A trainable ``lm_head`` is refused under ZeRO-3.
- **Each stage** writes its ``gradient_accumulation_steps``, ``gradient_clipping`` and batch
  sizes into the DeepSpeed config before ``prepare`` (:func:`configure_deepspeed`): accelerate
  would keep the config's values over the stage's.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["make_accelerator", "is_fsdp2", "is_deepspeed", "zero_stage", "configure_deepspeed",
           "zero3_head_step", "is_sharded", "shard_teacher", "teacher_step", "skeleton",
           "consolidated", "counterparts", "wrap_classes", "local_shard_shapes"]


def make_accelerator(**kwargs):
    """``accelerate.Accelerator(**kwargs)``, also right for CPU-only processes.

    ``accelerate launch`` with a multi-process config (``MULTI_GPU`` or ``FSDP``) starts the
    processes with torchrun. On a machine without GPUs or another accelerator, accelerate
    (1.16) would then give each process a single-process state with no process group,
    and it enables its FSDP plugin only on accelerators. There the processes are made CPU
    processes (gloo), and FSDP is switched on on the accelerator state exactly as accelerate
    itself does on a GPU (the plugin reads the same ``FSDP_*`` settings of the config);
    torch's ``fully_shard`` runs on gloo. DeepSpeed (``ACCELERATE_DEEPSPEED_*`` settings) is
    switched on the same way; on every machine ``zero3_init_flag: true`` is refused and the
    models load whole (:func:`_checked_deepspeed`).
    """
    import os

    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (
        torch.accelerator.is_available())
    if not cpu_processes:
        return _checked_deepspeed(Accelerator(**kwargs))
    accelerator = Accelerator(cpu=True, **kwargs)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()  # reads the ACCELERATE_DEEPSPEED_* settings of the config
        plugin.set_mixed_precision(accelerator.mixed_precision)
        plugin.select(_from_accelerator_state=True)
        accelerator.state.deepspeed_plugins = plugin
        accelerator.state.distributed_type = DistributedType.DEEPSPEED
        PartialState().distributed_type = DistributedType.DEEPSPEED
        return _checked_deepspeed(accelerator)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        plugin = FullyShardedDataParallelPlugin()
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.fsdp_plugin = plugin
        # Both shared states: accelerate rebuilds AcceleratorState from PartialState's.
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState().distributed_type = DistributedType.FSDP
    return accelerator


def _checked_deepspeed(accelerator):
    """``accelerator``; under DeepSpeed, ``zero3_init_flag: true`` refused and transformers
    told not to partition models as they load (see the module docstring)."""
    if not is_deepspeed(accelerator):
        return accelerator
    if accelerator.state.deepspeed_plugin.zero3_init_flag:
        raise ValueError("deepspeed_config.zero3_init_flag: true is not supported (models load "
                         "whole, then ZeRO-3 partitions the student); set "
                         "zero3_init_flag: false in the accelerate config")
    from transformers.integrations import unset_hf_deepspeed_config

    # accelerate registers the ZeRO-3 config with transformers even with zero3_init_flag off,
    # which would make from_pretrained load partitioned (empty) weights.
    unset_hf_deepspeed_config()
    return accelerator


def is_fsdp2(accelerator) -> bool:
    """Whether ``accelerator`` runs FSDP2 (``fully_shard``)."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def is_deepspeed(accelerator) -> bool:
    """Whether ``accelerator`` runs DeepSpeed (ZeRO)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_sharded(accelerator) -> bool:
    """FSDP2 or DeepSpeed: checkpoints are written by every process, the stage's model is
    consolidated from the shards."""
    return is_fsdp2(accelerator) or is_deepspeed(accelerator)


def zero_stage(accelerator) -> int:
    """The ZeRO stage under DeepSpeed; 0 otherwise."""
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config
               .get("zero_optimization", {}).get("stage", 0))


def configure_deepspeed(accelerator, stage, micro_batch: int) -> None:
    """Write the stage's accumulation, clipping and batch sizes into the DeepSpeed config,
    before ``prepare`` (accelerate keeps the config's values; every stage prepares anew)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["gradient_accumulation_steps"] = int(stage.grad_accum)
    config["gradient_clipping"] = float(stage.max_grad_norm)
    config["train_micro_batch_size_per_gpu"] = int(micro_batch)
    config["train_batch_size"] = int(micro_batch) * int(stage.grad_accum) * (
        accelerator.num_processes)
    if zero_stage(accelerator) == 3:  # get_state_dict needs the gathered weights at the end
        config.setdefault("zero_optimization", {})[
            "stage3_gather_16bit_weights_on_model_save"] = True


class _GatheredHead(nn.Module):
    """A frozen ``lm_head`` whose weight and bias are gathered copies (no parameters)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def zero3_head_step(losses, owner: nn.Module, stage_name: str = ""):
    """``losses`` with ``owner.lm_head`` (ZeRO-3 partitioned, frozen) gathered once for the
    whole call: the losses read a whole copy (the fused KD keeps the weight for its backward,
    after the partition is released again); the module is put back after the call.
    Refuses a trainable ``lm_head`` (``trainable: all``) in one line."""
    import deepspeed

    head = owner.lm_head
    params = [p for p in (head.weight, head.bias) if p is not None]
    if any(p.requires_grad for p in params):
        raise ValueError(f"stage {stage_name}: trainable: a trainable lm_head is not supported "
                         f"under ZeRO-3 (the fused losses read it outside the forward); use "
                         f"ZeRO-2 or FSDP2, or a trainable that leaves lm_head frozen")

    def step(prepared, batch):
        with deepspeed.zero.GatheredParameters(params):
            whole = _GatheredHead(head.weight.detach().clone(), None if head.bias is None
                                  else head.bias.detach().clone())
        # An instance attribute shadows the submodule: the module tree (and DeepSpeed's
        # hooks on it) stays as it is.
        owner.__dict__["lm_head"] = whole
        try:
            return losses(prepared, batch)
        finally:
            del owner.__dict__["lm_head"]

    if hasattr(losses, "need_teacher"):  # what the trainer reads off the losses
        step.need_teacher = losses.need_teacher
    return step


def wrap_classes(model: nn.Module) -> tuple[type, ...]:
    """The module classes sharded one instance per group: the model's ``_no_split_modules``
    (decoder layers, vision encoder layers) that it actually contains."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(core, "_no_split_modules", None) or ())
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def _mesh_and_policy(accelerator):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None:  # the same sub-mesh accelerate shards the student on
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    return mesh, plugin.mixed_precision_policy or MixedPrecisionPolicy()


def shard_teacher(teacher: nn.Module, accelerator) -> nn.Module:
    """Shard a (frozen, eval) LLaVA teacher in place with ``fully_shard``; idempotent.

    Each of the teacher's own layer classes (:func:`wrap_classes`) is one group, resharded
    after its forward; ``teacher.model`` (the forward the losses call) is the root. An untied
    ``lm_head`` is a group of its own, which no forward gathers: :func:`teacher_step` gathers
    it once around each step's losses. A tied one is the embedding weight, in the root
    group; the root then stays gathered after its forward until :func:`teacher_step`
    reshards it. Either way one all-gather of ``lm_head`` per step. Mixed precision follows
    the accelerate config.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(teacher.model, FSDPModule):
        return teacher
    if any(p.requires_grad for p in teacher.parameters()):
        raise ValueError("shard_teacher: the teacher must be frozen (requires_grad_(False))")
    mesh, policy = _mesh_and_policy(accelerator)
    kwargs = dict(mesh=mesh, mp_policy=policy)
    classes = wrap_classes(teacher)
    layers = [m for m in teacher.modules() if classes and isinstance(m, classes)]
    for layer in reversed(layers):  # innermost first, as fully_shard requires
        if not isinstance(layer, FSDPModule):
            fully_shard(layer, reshard_after_forward=True, **kwargs)
    embedding = teacher.get_input_embeddings()
    tied = teacher.lm_head.weight is embedding.weight
    if not tied:
        fully_shard(teacher.lm_head, reshard_after_forward=True, **kwargs)
    fully_shard(teacher.model, reshard_after_forward=not tied, **kwargs)
    if tied:  # lm_head sits outside the root: read the embedding's (gathered) weight instead
        teacher.lm_head = _TiedHead(embedding)
    return teacher


class _TiedHead(nn.Module):
    """A tied ``lm_head`` of a sharded teacher: its weight is always the embedding's current
    one (sharded, or gathered during a step); the original full tensor is released."""

    bias = None

    def __init__(self, embedding: nn.Module):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # not a submodule: no second owner

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding.weight


def teacher_step(losses, teacher: nn.Module | None):
    """``losses`` with the sharded teacher's ``lm_head`` gathered once for the whole call
    (see :func:`shard_teacher`) and resharded after it."""
    from torch.distributed.fsdp import FSDPModule

    if teacher is None or not isinstance(getattr(teacher, "model", None), FSDPModule):
        return losses
    head = teacher.lm_head if isinstance(teacher.lm_head, FSDPModule) else teacher.model

    def step(prepared, batch):
        if head is teacher.lm_head:
            head.unshard()
        try:
            return losses(prepared, batch)
        finally:
            head.reshard()

    return step


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters live on the meta device (no memory), buffers
    copied; taken before sharding, it later receives the consolidated weights."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def consolidated(accelerator, prepared: nn.Module, skeleton_model: nn.Module
                 ) -> nn.Module | None:
    """The trained weights of ``prepared`` gathered into ``skeleton_model`` (its
    :func:`skeleton` taken before sharding) on the main process; None elsewhere.

    Collective: every process must call it (accelerate's ``get_state_dict`` gathers the
    full state dict to the main process's CPU memory).
    """
    full = accelerator.get_state_dict(prepared, unwrap=False)
    if not accelerator.is_main_process:
        return None
    skeleton_model.load_state_dict(full, strict=True, assign=True)
    return skeleton_model


def counterparts(original: nn.Module, copy_root: nn.Module, modules: dict) -> dict:
    """``modules`` (name -> a submodule of ``original``, or anything else) with each
    submodule replaced by the module at the same path in ``copy_root``."""
    paths = {id(m): name for name, m in original.named_modules()}
    return {key: copy_root.get_submodule(paths[id(value)])
            if isinstance(value, nn.Module) and id(value) in paths else value
            for key, value in modules.items()}


def local_shard_shapes(model: nn.Module) -> dict:
    """``{name: (local shape, full shape)}`` of every sharded (DTensor) parameter."""
    from torch.distributed.tensor import DTensor

    return {name: (tuple(p.to_local().shape), tuple(p.shape))
            for name, p in model.named_parameters() if isinstance(p, DTensor)}
