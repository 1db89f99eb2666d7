"""Remedies for evaluation in training mode: eval() for no-grad forwards, BN statistics."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import MODE_DEPENDENT, NotApplicable, RemedyEntry, model_var, span

__all__ = ["ENTRIES"]


class _EvalForNoGrad:
    """Forward pre/post hooks: mode-dependent layers in eval mode for no-grad forwards."""

    def __init__(self) -> None:
        self.switched: list[list[nn.Module]] = []

    def pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled():
            return
        # Every module, as model.eval() does: attention and RNN dropout are no layers of
        # their own, and custom modules read self.training.
        layers = [m for m in module.modules() if m.training]
        for m in layers:
            m.training = False
        self.switched.append(layers)

    def post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch.is_grad_enabled() and not self.switched:
            return
        if self.switched:
            for m in self.switched.pop():
                m.training = True


def _mode_dependent(m: nn.Module) -> bool:
    """Behaves differently in training mode: dropout (also attention's and an RNN's between
    its layers), normalisation with running statistics, RReLU."""
    p = getattr(m, "dropout", None)
    return isinstance(m, MODE_DEPENDENT) or (
        isinstance(m, (nn.MultiheadAttention, nn.RNNBase)) and isinstance(p, float) and p > 0)


def _eval_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    layers = [n for n, m in model.named_modules() if _mode_dependent(m)]
    if not layers:
        raise NotApplicable("the model has no Dropout or BatchNorm layer; custom "
                            "self.training logic needs model.eval() in the script")
    hooks = _EvalForNoGrad()
    model.register_forward_pre_hook(hooks.pre, prepend=True)
    model.register_forward_hook(hooks.post, always_call=True)
    changes.append(f"forwards without gradients (torch.no_grad, inference_mode) run "
                   f"{len(layers)} mode-dependent layer(s) ({span(layers)}) in eval mode, "
                   "restored afterwards")


ENTRIES = [
    RemedyEntry(
        "call_model_eval",
        lambda p: (f"call {model_var(p)}.eval() before evaluating and {model_var(p)}.train() "
                   "after: eval mode makes Dropout keep every unit and BatchNorm use (and stop "
                   "updating) its running statistics; torch.no_grad() only stops gradient "
                   "tracking, so evaluation needs both"),
        lambda p: (f"{model_var(p)}.eval()  # Dropout keeps every unit; BatchNorm uses its "
                   "running statistics\n"
                   "with torch.no_grad():\n"
                   f"    val_out = {model_var(p)}(x)  # your evaluation loop\n"
                   f"{model_var(p)}.train()  # back to training mode before the next "
                   "training step"),
        to_model=_eval_model,
        loss_neutral=True),
    RemedyEntry(
        "recompute_bn_statistics",
        lambda p: ("the BatchNorm running statistics now hold evaluation batches: once the "
                   "loop calls eval(), re-estimate them on training data before the model is "
                   "saved or used (or train long enough for their momentum to wash those "
                   "batches out)"),
        lambda p: ("# re-estimate the BatchNorm running statistics on training batches\n"
                   f"torch.optim.swa_utils.update_bn([x], {model_var(p)})  "
                   "# your training DataLoader instead of [x]"),
        loss_neutral=True,
        needs=("re-estimating BatchNorm statistics needs the training data; apply call_model_eval, "
 "which keeps evaluation batches out of the running statistics, or call "
 "torch.optim.swa_utils.update_bn(train_loader, model) after training")),
]
