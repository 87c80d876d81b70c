"""TAF for the non-LLaVA families (docs/taf.md, docs/families.md): each connector of the
student becomes a frozen copy of the teacher's followed by a trainable post-connector
``Linear(d_t, d_s)``.

The connectors (:func:`taf_sites`): Qwen2.5-VL's vision merger; Qwen3-VL's merger *and each
DeepStack merger*, each with its own post-connector; the ``multi_modal_projector`` of
LLaVA-OneVision, InternVL and Gemma 3.

The saved checkpoint stays a plain model of the family: each post-connector is folded into its
connector's last layer, the same function, so ``from_pretrained`` and any tool load it. Where
that layer is a Linear with a bias, ``post(W x + b) = (P W) x + (P b + c)``. Gemma 3's last
layer is a bias-free matrix (``x @ W``), so its post-connector has no bias either and folds to
``x @ (W P^T)``. The unfolded TAF connectors are written next to it in :data:`TAF_FILE`;
:func:`load_taf_parts` rebuilds them, so training resumes on the same parameters.

LLaVA-OneVision's and InternVL's projectors are as wide inside as the language model: the
teacher's is wider than the student's plain one, so their folded checkpoint has other shapes
than the family's and plain ``from_pretrained`` refuses it (a size mismatch, never a silently
different model); :func:`load_family_taf` loads it.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .families import Family, family_of

__all__ = ["TAF_FILE", "TAFConnector", "apply_family_taf", "folded_state_dict",
           "is_taf", "load_family_taf", "load_taf_parts", "save_taf", "taf_sites"]

TAF_FILE = "compodistill_taf.safetensors"

# Per family: where the connectors sit in the ...ForConditionalGeneration (a trailing ``*``:
# every entry of that ModuleList) and the name of each connector's last layer.
_SITES = {
    "qwen2_5_vl": (("model.visual.merger", "mlp.2"),),
    "qwen3_vl": (("model.visual.merger", "linear_fc2"),
                 ("model.visual.deepstack_merger_list.*", "linear_fc2")),
    "llava_onevision": (("model.multi_modal_projector", "linear_2"),),
    "internvl": (("model.multi_modal_projector", "linear_2"),),
    "gemma3": (("model.multi_modal_projector", "mm_input_projection_weight"),),
}


class TAFConnector(nn.Module):
    """``post(teacher(x))``: a teacher connector (frozen) and ``post = Linear(d_t, d_s)``."""

    def __init__(self, teacher: nn.Module, post: nn.Linear, last: str):
        super().__init__()
        self.teacher, self.post, self.last = teacher, post, last
        self.freeze_teacher_part()

    def freeze_teacher_part(self) -> None:
        """Only ``post`` trains (docs/taf.md)."""
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.post(self.teacher(hidden_states))


def taf_sites(model: nn.Module, family: Family | None = None) -> list[tuple[str, str]]:
    """``(module path, last layer name)`` of every connector TAF replaces in ``model``.
    ``family``: the model's, when the caller has resolved it already.

    Raises:
        ValueError: a family without TAF, naming it.
    """
    family = family or family_of(model)
    if family.name not in _SITES:
        raise ValueError(f"TAF is not defined for the {family.title} family here")
    sites = []
    for path, last in _SITES[family.name]:
        if path.endswith(".*"):
            container = model.get_submodule(path[:-2])
            sites.extend((f"{path[:-2]}.{i}", last) for i in range(len(container)))
        else:
            sites.append((path, last))
    return sites


def _last_out_width(connector: nn.Module, last: str) -> int:
    layer = _get(connector, last)
    return layer.out_features if isinstance(layer, nn.Linear) else layer.shape[1]


def _get(module: nn.Module, name: str):
    """A submodule, or a parameter (Gemma 3's projection matrix)."""
    parent, _, leaf = name.rpartition(".")
    owner = module.get_submodule(parent) if parent else module
    return getattr(owner, leaf)


def _set(module: nn.Module, name: str, value) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, value)


def _has_bias(layer) -> bool:
    return isinstance(layer, nn.Linear) and layer.bias is not None


def is_taf(model: nn.Module) -> bool:
    """Whether a model holds a :class:`TAFConnector` (unwrapped, not a peft model)."""
    return any(isinstance(m, TAFConnector) for m in model.modules())


def _vision_width(config) -> tuple:
    vision = config.vision_config
    return (getattr(vision, "hidden_size", None), getattr(vision, "spatial_merge_size", None),
            getattr(config, "downsample_ratio", None), getattr(config, "mm_tokens_per_image", None))


def apply_family_taf(student: nn.Module, teacher: nn.Module,
                     family: Family | None = None) -> nn.Module:
    """Replace each connector of the student (in place) by the teacher's, frozen, plus a
    trainable ``Linear(d_t, d_s)`` (bias-free where the last layer has none); returns the
    student. ``family``: the pair's (one family), when the caller has resolved it already.

    Raises:
        ValueError: the connectors read vision features of different widths, or the family
            has no TAF.
    """
    if _vision_width(student.config) != _vision_width(teacher.config):
        raise ValueError(f"TAF needs the same vision features in both models: student vision "
                         f"(hidden, merge, downsample, tokens) {_vision_width(student.config)} "
                         f"vs teacher {_vision_width(teacher.config)}")
    family = family or family_of(student)
    sites_t = dict(taf_sites(teacher, family))
    for path, last in taf_sites(student, family):
        if path not in sites_t:
            raise ValueError(f"TAF: the teacher has no connector {path} (DeepStack depth?)")
        conn_t, conn_s = teacher.get_submodule(path), student.get_submodule(path)
        ref = next(conn_s.parameters())
        frozen = copy.deepcopy(conn_t).to(device=ref.device, dtype=ref.dtype)
        post = nn.Linear(_last_out_width(conn_t, last), _last_out_width(conn_s, last),
                         bias=_has_bias(_get(conn_t, last))).to(device=ref.device,
                                                                dtype=ref.dtype)
        _set(student, path, TAFConnector(frozen, post, last))
    return student


def _fold(last, post: nn.Linear) -> dict[str, torch.Tensor]:
    """The plain last layer that computes ``post(last(x))`` (float64, stored as saved)."""
    p = post.weight.double()
    if isinstance(last, nn.Linear):
        out = {"weight": (p @ last.weight.double()).to(last.weight.dtype)}
        if last.bias is not None:
            out["bias"] = (p @ last.bias.double() + post.bias.double()).to(last.bias.dtype)
        return out
    return {"": (last.double() @ p.T).to(last.dtype)}  # x @ W, then x @ P^T: no bias


def _connectors(model: nn.Module) -> list[tuple[str, TAFConnector]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TAFConnector)]


def folded_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every TAF connector folded into a plain connector's keys."""
    state = dict(model.state_dict())
    with torch.no_grad():
        for path, conn in _connectors(model):
            prefix = path + "."
            for key in [k for k in state if k.startswith(prefix)]:
                value = state.pop(key)
                inner = key[len(prefix):]
                if inner.startswith("teacher.") and not (
                        inner[len("teacher."):] == conn.last
                        or inner[len("teacher."):].startswith(conn.last + ".")):
                    state[prefix + inner[len("teacher."):]] = value
            for name, value in _fold(_get(conn.teacher, conn.last), conn.post).items():
                state[prefix + conn.last + ("." + name if name else "")] = value
    return state


def taf_parts(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every TAF connector unfolded, keyed ``<connector path>.teacher.*`` / ``.post.*``."""
    return {f"{path}.{k}": v for path, conn in _connectors(model)
            for k, v in conn.state_dict().items()}


def _uninitialised_linear(d_in: int, d_out: int, bias: bool) -> nn.Linear:
    """A Linear whose weights are about to be loaded: built without its random init, so that
    loading a checkpoint draws nothing from the global random stream (the next stage's LoRA
    init must not depend on whether the previous stage's output was reloaded)."""
    return torch.nn.utils.skip_init(nn.Linear, d_in, d_out, bias=bias)


def _resized(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``module`` whose Linears and parameters take the shapes in ``state`` (the
    teacher's connector is as wide as the teacher's language model)."""
    module = copy.deepcopy(module)
    for key, value in state.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        current = getattr(owner, leaf)
        if current.shape == value.shape:
            continue
        if isinstance(owner, nn.Linear) and leaf == "weight":
            _set(module, owner_name, _uninitialised_linear(value.shape[1], value.shape[0],
                                                           owner.bias is not None))
        elif not isinstance(owner, nn.Linear):
            setattr(owner, leaf, nn.Parameter(torch.empty_like(value)))
    return module


def load_taf_parts(model: nn.Module, folder) -> nn.Module:
    """Rebuild the TAF connectors of a saved TAF student from ``folder/TAF_FILE`` (no-op
    without it): each connector's saved teacher half (frozen) and post-connector."""
    from safetensors.torch import load_file

    path = Path(folder) / TAF_FILE
    if not path.is_file():
        return model
    parts = load_file(str(path))
    for site, last in taf_sites(model):
        teacher = {k[len(site) + 9:]: v for k, v in parts.items()
                   if k.startswith(f"{site}.teacher.")}
        post = {k[len(site) + 6:]: v for k, v in parts.items() if k.startswith(f"{site}.post.")}
        if not teacher or "weight" not in post:
            raise ValueError(f"{path}: no TAF parts for the connector {site}")
        connector = model.get_submodule(site)
        ref = next(connector.parameters())
        frozen = _resized(connector, teacher)
        frozen.load_state_dict(teacher)
        layer = _uninitialised_linear(post["weight"].shape[1], post["weight"].shape[0],
                                      "bias" in post)
        layer.load_state_dict(post)
        _set(model, site, TAFConnector(frozen.to(ref.device, ref.dtype),
                                       layer.to(ref.device, ref.dtype), last))
    return model


def load_family_taf(cls, path, **kwargs) -> nn.Module:
    """``cls.from_pretrained(path)`` of a saved TAF student, TAF connectors rebuilt.

    Where the folded connector has other shapes than the family's plain one (LLaVA-OneVision
    and InternVL: the connector's hidden width is the language model's, so a teacher's is
    wider), only those connector weights are mismatched; they are replaced from
    :data:`TAF_FILE`, and any other mismatch is an error.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(path, ignore_mismatched_sizes=True,
                                          output_loading_info=True, **kwargs)
    sites = tuple(site + "." for site, _ in taf_sites(model))
    stray = sorted(k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"])
    stray = [k for k in stray if not k.startswith(sites)]
    if stray:
        raise ValueError(f"{path}: weights of other shapes than the model's outside the TAF "
                         f"connectors: {stray[:5]}")
    return load_taf_parts(model, path)


def save_taf(model: nn.Module, folder) -> None:
    """``save_pretrained`` of the folded model (a plain checkpoint) plus :data:`TAF_FILE`."""
    from safetensors.torch import save_file

    model.save_pretrained(folder, state_dict=folded_state_dict(model), safe_serialization=True)
    save_file({k: v.detach().contiguous() for k, v in taf_parts(model).items()},
              str(Path(folder) / TAF_FILE))
