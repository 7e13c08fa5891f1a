"""``patch_opt``: our kernels inside a ``transformers`` OPT model, for trainers that keep their own loop.

    from opt_core.hf import patch_opt
    model = transformers.OPTForCausalLM.from_pretrained(path)
    print(patch_opt(model))        # in place; the report counts what was replaced
    # or, before any model is built or loaded:  patch_opt();  model = ....from_pretrained(path)

Three pieces, each with its own flag, from one table (``TABLE``: transformers class -> piece ->
replacement):

- ``attention``: every ``OPTAttention`` calls ``opt_core.functional.attention`` through transformers'
  attention-function registry (``register_attention``: ``attn_implementation="opt_core"`` works as
  well).  A matching mask function is registered too: without one transformers hands a custom
  attention no padding mask at all, and the flash-attention one reads ``mask.all()`` back to the host.
  Ours passes the (batch, seqlen_k) key padding mask on as it is; causality is the kernel's flag.
- ``layer_norm``: every ``nn.LayerNorm`` becomes ``FusedLayerNorm`` (same parameters, same keys).
- ``mlp``: each ``OPTDecoderLayer`` computes its feed-forward half (fc1, ReLU, fc2, dropout, residual)
  in one ``relu_mlp`` call; its attention half stays transformers' own code.

State-dict keys, outputs, gradients, padding and dropout (same probabilities, training only; the
masks come from our counter-based generator, not torch's) are kept.  Everything is checked before
anything changes: a model or submodule the table does not know raises, naming its class.

Supported: transformers 5 (attention and mask registries, decoder layers that return a tensor);
what is missing is named when a piece needs it.  Static and sliding-window KV caches are refused
(the kernel aligns causality at the bottom right of the keys it is given).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.models.opt import modeling_opt

from opt_core.functional import attention
from opt_core.kernels.attention import MAX_HEAD_DIM
from opt_core.layers import FusedLayerNorm, linear_relu_mlp
from opt_core.seeds import draw_seed
from opt_core.replace import replace_layer_norms

try:  # the registries (transformers >= 4.53); without them the attention piece is refused by name
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
    from transformers.modeling_utils import AttentionInterface
except ImportError:
    AttentionMaskInterface = AttentionInterface = causal_mask_function = None

ATTENTION_NAME = "opt_core"
PIECES = ("attention", "layer_norm", "mlp")
# The model classes patch_opt takes (those this transformers has); their submodules are what TABLE names.
MODEL_CLASSES = tuple(getattr(modeling_opt, name) for name in (
    "OPTForCausalLM", "OPTModel", "OPTDecoder", "OPTForSequenceClassification", "OPTForQuestionAnswering")
    if hasattr(modeling_opt, name))


# --------------------------------------------------------------------------- attention through the registry
def opt_core_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                       dropout: float = 0.0, **kwargs):
    """transformers' attention-function interface over ``opt_core.functional.attention``.

    query/key/value come as (batch, heads, seqlen, head_dim) and reach the kernel as strided views (no
    copy); the output is (batch, seqlen_q, heads, head_dim), with no attention weights (as SDPA's).
    ``attention_mask`` is what ``padding_mask`` gives: None or the bool (batch, seqlen_k) key padding
    mask.  transformers passes ``dropout`` > 0 only in training."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be the (batch, seqlen_k) key padding mask that the {ATTENTION_NAME!r} mask function "
            f"gives, got shape {tuple(attention_mask.shape)}: a prepared 4-D mask may hold any pattern, which the "
            "kernel (causal plus key padding) cannot represent; use attn_implementation='sdpa' for it")
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    # A seed drawn as a symbolic int: no .item(), so no graph break under torch.compile.
    seed = draw_seed() if dropout > 0 else None
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal,
                    softmax_scale=scaling, key_padding_mask=attention_mask, dropout_p=dropout, seed=seed)
    return out, None


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                 mask_function: Optional[Callable] = None, attention_mask: Optional[torch.Tensor] = None,
                 **kwargs) -> Optional[torch.Tensor]:
    """transformers' attention-mask interface for ``opt_core_attention``: the bool (batch, kv_length) key
    padding mask, or None when there is none.  Nothing (batch, q, k)-sized is built and nothing is read
    back to the host: padding is the kernel's key_padding_mask, causality its ``causal`` flag."""
    if mask_function is not None and mask_function is not causal_mask_function:
        raise ValueError(f"the {ATTENTION_NAME!r} attention takes plain causal masks, got the mask function "
                         f"{getattr(mask_function, '__name__', mask_function)!r}; use attn_implementation='sdpa'")
    # A static cache gives its offset as a tensor and keys beyond the tokens seen; a sliding window an
    # offset into them.  The kernel's causal mask is aligned at the bottom right of the keys it gets.
    if isinstance(q_offset, torch.Tensor) or kv_offset != 0 or kv_length != q_offset + q_length:
        raise ValueError(f"the {ATTENTION_NAME!r} attention needs every key seen so far and no other (a dynamic "
                         f"cache or none); got kv_length={kv_length}, kv_offset={kv_offset} for "
                         f"{q_length} queries at offset {q_offset}: static and sliding-window caches are not supported")
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != (batch_size, kv_length):
        raise ValueError(f"attention_mask must have shape (batch, seqlen_k) = ({batch_size}, {kv_length}), "
                         f"got {tuple(attention_mask.shape)}")
    return attention_mask.bool()


def _missing_for(pieces: tuple[str, ...]) -> list[str]:
    """What this transformers lacks for ``pieces``, in words."""
    missing = []
    if "attention" in pieces and AttentionInterface is None:
        missing.append("transformers.modeling_utils.AttentionInterface and masking_utils.AttentionMaskInterface "
                       "(the attention piece)")
    # transformers 4 decoder layers return a tuple, of which the decoder takes [0].
    returns = inspect.signature(modeling_opt.OPTDecoderLayer.forward).return_annotation
    if "mlp" in pieces and returns not in (torch.Tensor, "torch.Tensor"):
        missing.append(f"an OPTDecoderLayer.forward that returns a tensor, not {returns} (the mlp piece)")
    return missing


def _require(pieces: tuple[str, ...]) -> None:
    missing = _missing_for(pieces)
    if missing:
        raise RuntimeError(f"patch_opt needs transformers 5; transformers {transformers.__version__} lacks "
                           + "; ".join(missing) + ". Upgrade it, or leave those pieces out")


def register_attention() -> str:
    """Register ``ATTENTION_NAME`` ("opt_core") with transformers' attention functions and attention masks,
    so ``from_pretrained(..., attn_implementation="opt_core")`` and ``set_attn_implementation("opt_core")``
    work; returns the name.  Idempotent."""
    _require(("attention",))
    AttentionInterface.register(ATTENTION_NAME, opt_core_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, padding_mask)
    return ATTENTION_NAME


# --------------------------------------------------------------------------- the fused-MLP decoder layer
class OPTDecoderLayer(modeling_opt.OPTDecoderLayer):
    """transformers' ``OPTDecoderLayer`` whose feed-forward half is one ``relu_mlp`` call (fc1, ReLU, fc2,
    dropout and the residual add in the kernel's epilogues).  No new state: ``patch_opt`` swaps a
    layer's class to this one, so submodules, parameters and state-dict keys stay.  It keeps
    transformers' class name, so what finds decoder layers by name (``_no_split_modules``: FSDP
    auto-wrap, device maps) still does."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        kwargs.pop("use_cache", None)  # the layer's own argument: transformers' layer keeps it from the attention too
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)[0]
        hidden_states = residual + F.dropout(hidden_states, p=self.dropout, training=self.training)
        if not self.do_layer_norm_before:  # 350M: post-LN
            hidden_states = self.self_attn_layer_norm(hidden_states)
        mlp_input = self.final_layer_norm(hidden_states) if self.do_layer_norm_before else hidden_states
        hidden_states = self._feed_forward(mlp_input, residual=hidden_states)
        if not self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states

    def _feed_forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + dropout(fc2(relu(fc1(x))))`` in the fused op, autocast as ``opt_core.ReLUMLP`` does it."""
        return linear_relu_mlp(self.fc1, self.fc2, x, residual, dropout_p=self.dropout, training=self.training)


# --------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Replacement:
    """What one piece does to the modules of one transformers class."""

    becomes: str                                        # in the report's words
    done: Callable[[nn.Module], bool]                   # already replaced (by an earlier patch_opt)
    check: Callable[[nn.Module, str, nn.Module], None]  # (model, name, module): raise if it cannot be replaced
    apply: Callable[[nn.Module, list], None]            # (model, the modules found): replace them


def _check_attention(model: nn.Module, name: str, module: nn.Module) -> None:
    if module.config is not model.config:
        raise ValueError(f"{name}: its config is not the model's, and the attention implementation is set on the "
                         "model's config")
    if not 1 <= module.head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head_dim {module.head_dim}; the attention kernel takes 1 to {MAX_HEAD_DIM}")


def _check_mlp(model: nn.Module, name: str, layer: nn.Module) -> None:
    for linear in ("fc1", "fc2"):
        kind = type(getattr(layer, linear))
        if kind is not nn.Linear:
            raise ValueError(f"{name}.{linear} is a {kind.__name__}, not an nn.Linear: the fused MLP reads the "
                             "weights itself and would bypass it (LoRA, quantisation); pass mlp=False")
    if type(layer.activation_fn) is not nn.ReLU:
        raise ValueError(f"{name}: activation {type(layer.activation_fn).__name__}; the fused MLP is ReLU only "
                         "(activation_function='relu'); pass mlp=False")


def _no_check(model: nn.Module, name: str, module: nn.Module) -> None:
    """An exact nn.LayerNorm is always replaceable (subclasses are refused before checks run)."""


def _route_attention(model: nn.Module, modules: list) -> None:
    model.set_attn_implementation(register_attention())


def _fuse_mlp(model: nn.Module, layers: list) -> None:
    for layer in layers:
        layer.__class__ = OPTDecoderLayer


def _fuse_layer_norms(model: nn.Module, norms: list) -> None:
    replace_layer_norms(model)  # exactly the nn.LayerNorm modules found, under every name they have


# transformers' class -> piece -> its replacement.  Modules of other classes (Linear, Embedding, ...) stay.
TABLE: dict[type, dict[str, Replacement]] = {
    modeling_opt.OPTAttention: {"attention": Replacement(
        f"the {ATTENTION_NAME} attention kernel", lambda m: m.config._attn_implementation == ATTENTION_NAME,
        _check_attention, _route_attention)},
    modeling_opt.OPTDecoderLayer: {"mlp": Replacement(
        "one relu_mlp call", lambda m: type(m) is OPTDecoderLayer, _check_mlp, _fuse_mlp)},
    nn.LayerNorm: {"layer_norm": Replacement(
        "FusedLayerNorm", lambda m: type(m) is FusedLayerNorm, _no_check, _fuse_layer_norms)},
}


# --------------------------------------------------------------------------- patching
@dataclasses.dataclass(frozen=True)
class PatchReport:
    """What ``patch_opt`` replaced: per piece, how many modules (of one model) or classes (by class)."""

    target: str
    unit: str = "modules"
    attention: int = 0
    layer_norm: int = 0
    mlp: int = 0

    def __str__(self) -> str:
        becomes = {piece: r.becomes for replacements in TABLE.values() for piece, r in replacements.items()}
        one = {"modules": "module", "classes": "class"}[self.unit]
        done = [f"{piece}: {n} {one if n == 1 else self.unit} -> {becomes[piece]}"
                for piece in PIECES if (n := getattr(self, piece))]
        return f"patch_opt({self.target}): " + ("; ".join(done) if done else "nothing replaced")


def _targets(model: nn.Module, pieces: tuple[str, ...]) -> dict[str, list]:
    """piece -> the modules of ``model`` it replaces, after every check (nothing is changed here)."""
    if type(model) not in MODEL_CLASSES:
        what = f"the class {model.__name__}" if isinstance(model, type) else type(model).__name__
        raise TypeError(f"patch_opt does not know {what}: it patches instances of transformers' "
                        f"{', '.join(c.__name__ for c in MODEL_CLASSES)} (or, called without a model, the classes); "
                        "opt_core.replace_layer_norms swaps the LayerNorms of any model")
    found: dict[str, list] = {piece: [] for piece in pieces}
    for name, module in model.named_modules():
        for cls, replacements in TABLE.items():
            for piece, replacement in replacements.items():
                if piece not in pieces or not isinstance(module, cls) or replacement.done(module):
                    continue
                if type(module) is not cls:
                    raise TypeError(f"patch_opt does not know {type(module).__name__} (at {name!r}, a subclass of "
                                    f"{cls.__name__}): its own forward would be lost; pass {piece}=False")
                replacement.check(model, name, module)
                found[piece].append(module)
    return found


def _patch_instance(model: nn.Module, pieces: tuple[str, ...]) -> PatchReport:
    targets = _targets(model, pieces)
    for replacements in TABLE.values():
        for piece, replacement in replacements.items():
            if targets.get(piece):
                replacement.apply(model, targets[piece])
    return PatchReport(type(model).__name__, **{piece: len(modules) for piece, modules in targets.items()})


# The pieces every OPTDecoder gets at the end of its construction (patch_opt without a model).
_CLASS_PIECES: tuple[str, ...] = ()


def _post_init_then_patch(decoder: nn.Module) -> None:
    # Every OPT model builds exactly one OPTDecoder, which holds all the layers, norms and attentions;
    # post_init ends its __init__, before from_pretrained loads weights by name.
    super(modeling_opt.OPTDecoder, decoder).post_init()
    if _CLASS_PIECES:
        _patch_instance(decoder, _CLASS_PIECES)


def _patch_classes(pieces: tuple[str, ...]) -> PatchReport:
    global _CLASS_PIECES
    if "attention" in pieces:
        register_attention()
    _CLASS_PIECES = pieces
    modeling_opt.OPTDecoder.post_init = _post_init_then_patch
    return PatchReport("OPT models built or loaded from now on", "classes", **{piece: 1 for piece in pieces})


def patch_opt(model: Optional[nn.Module] = None, *, attention: bool = True, layer_norm: bool = True,
              mlp: bool = True) -> PatchReport:
    """Put opt_core's kernels into a ``transformers`` OPT model in place, or with no ``model`` into every
    OPT model built or loaded from then on (a later call without a model replaces that choice; all three
    flags False ends it).  Returns what was replaced.

    A model class other than transformers' OPT ones, or a submodule the table does not know (a subclass
    of one of its classes, a non-Linear fc1, a non-ReLU activation), raises before anything is changed.
    Patch before sharding (FSDP's ``fully_shard``) or compiling; an optimizer built before keeps working,
    as the parameters themselves are kept.  By class, the attention piece overrides whatever
    ``attn_implementation`` a later load asks for (``attention=False`` leaves it to the load)."""
    flags = {"attention": attention, "layer_norm": layer_norm, "mlp": mlp}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    pieces = tuple(piece for piece in PIECES if flags[piece])
    _require(pieces)
    if model is None:
        return _patch_classes(pieces)
    return _patch_instance(model, pieces)
