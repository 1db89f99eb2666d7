"""Remedy code in the language of the framework that trains the model.

A plain script sets its learning rate where it creates the optimizer and clips between
``loss.backward()`` and ``optimizer.step()``; under PyTorch Lightning the rate lives in the
LightningModule's ``configure_optimizers`` and clipping is a ``Trainer`` argument, under the
Hugging Face ``Trainer`` both are ``TrainingArguments``. When the run's facts name the
framework (``facts["framework"]``, read by ``measure.frameworks``), each remedy whose plain
code touches the optimizer, clipping, the schedule or the training loop is rendered by the
framework's table below: its code says where and how to change it there, and one sentence is
added to its text. Remedies that change the model (init, activations, normalisation) keep
their code: the layers they name are module paths under either framework.

Adding a framework is one more table in :data:`FRAMEWORKS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ..findings import Remedy

__all__ = ["FRAMEWORKS", "render"]

Params = Mapping[str, Any]
Facts = Mapping[str, Any]
Render = Callable[[Params, Facts], tuple[str, str]]
"""(the sentence added to the remedy's text, the remedy's code in the framework's terms)"""


def _cls(fw: Facts) -> str:
    return str(fw.get("module_class") or "LightningModule")


def _optimizer(fw: Facts, default: str = "Adam") -> str:
    names = fw.get("optimizers") or [default]
    return f"torch.optim.{names[0]}"


def _manual(fw: Facts) -> bool:
    """A LightningModule that steps its optimizers itself (automatic_optimization False)."""
    return fw.get("automatic_optimization") is False


def _trainer(fw: Facts, key: str) -> Any:
    return (fw.get("trainer") or {}).get(key)


# --------------------------------------------------------------------------- Lightning
def _pl_lower_lr(p: Params, fw: Facts) -> tuple[str, str]:
    cls, lr = _cls(fw), p["lr"]
    code = (f"# in {cls}.configure_optimizers: create the optimizer with the lower rate\n"
            "def configure_optimizers(self):\n"
            f"    return {_optimizer(fw)}(self.parameters(), lr={lr})  # was {p['old_lr']}")
    attribute = fw.get("lr_attribute")
    if attribute:
        name = str(attribute).rsplit(".", 1)[-1]
        code += (f"\n# or, as configure_optimizers reads {attribute}: create {cls} with "
                 f"{name}={lr}")
    return (f"under Lightning the rate is set where {cls}.configure_optimizers creates the "
            f"optimizer: lr={lr}", code)


def _pl_clip(p: Params, fw: Facts) -> tuple[str, str]:
    t = p["max_norm"]
    if _manual(fw):
        return (f"under Lightning with manual optimization, {_cls(fw)}.training_step clips "
                f"with self.clip_gradients before opt.step()",
                f"# in {_cls(fw)}.training_step, after self.manual_backward(loss):\n"
                f"self.clip_gradients(opt, gradient_clip_val={t}, "
                "gradient_clip_algorithm=\"norm\")\n"
                "opt.step()")
    now = _trainer(fw, "gradient_clip_val")
    return ("under Lightning the Trainer clips, between the backward pass and the optimizer "
            "step: Trainer(gradient_clip_val=..., gradient_clip_algorithm=\"norm\")",
            f"trainer = Trainer(..., gradient_clip_val={t}, gradient_clip_algorithm=\"norm\")"
            + (f"  # now gradient_clip_val={now}" if now else ""))


def _pl_hold_lr(p: Params, fw: Facts) -> tuple[str, str]:
    cls = _cls(fw)
    stepped = [s["type"] for s in fw.get("schedulers") or [] if s.get("interval") == "step"]
    return (f"under Lightning the \"interval\" of the scheduler that {cls}.configure_optimizers "
            "returns says whether it steps every batch (\"step\") or every epoch (\"epoch\")",
            f"# in {cls}.configure_optimizers: a scheduler meant per epoch steps per epoch\n"
            "return {\"optimizer\": optimizer,\n"
            "        \"lr_scheduler\": {\"scheduler\": scheduler, \"interval\": \"epoch\"}}"
            + (f"  # now {', '.join(stepped)}: \"step\"" if stepped else "") + "\n"
            f"# or hold a floor under the rate: in {cls}\n"
            "def on_before_optimizer_step(self, optimizer):\n"
            "    for group in optimizer.param_groups:\n"
            f"        group[\"lr\"] = max(group[\"lr\"], {p['floor']})")


def _pl_adam(p: Params, fw: Facts) -> tuple[str, str]:
    cls = _cls(fw)
    return (f"under Lightning, {cls}.configure_optimizers returns it",
            f"# in {cls}.configure_optimizers:\n"
            "def configure_optimizers(self):\n"
            "    return torch.optim.Adam(self.parameters(), lr=1e-3)")


def _pl_guard(p: Params, fw: Facts) -> tuple[str, str]:
    cls = _cls(fw)
    if _manual(fw):
        return (f"under Lightning with manual optimization, {cls}.training_step steps only "
                "on a finite loss",
                f"# in {cls}.training_step:\n"
                "if torch.isfinite(loss):\n"
                "    self.manual_backward(loss)\n"
                "    opt.step()\n"
                "opt.zero_grad()")
    return (f"under Lightning, {cls}.training_step returns None for such a batch and "
            "Lightning skips its backward and optimizer step",
            f"# at the end of {cls}.training_step:\n"
            "if not torch.isfinite(loss):\n"
            "    return None  # Lightning skips this batch's backward and optimizer step\n"
            "return loss")


def _skip_or_keep(p: Params, params: str, indent: str) -> str:
    """The skip-step rule on ``norm`` against ``self.recent``, at ``indent``."""
    return (f"{indent}if len(self.recent) == self.recent.maxlen and norm > {p['spike_factor']} "
            f"* statistics.median(self.recent):\n"
            f"{indent}    for q in {params}:\n"
            f"{indent}        q.grad = None  # a spike: no update for this step\n"
            f"{indent}else:\n"
            f"{indent}    self.recent.append(norm)")


def _pl_skip(p: Params, fw: Facts) -> tuple[str, str]:
    cls = _cls(fw)
    return (f"under Lightning, {cls}.on_before_optimizer_step sees the gradients before the "
            "Trainer clips them and drops a spiking step's (the optimizer skips a parameter "
            "without a gradient)",
            f"# in {cls}.__init__: self.recent = collections.deque(maxlen={p['window']})\n"
            "def on_before_optimizer_step(self, optimizer):  # before Lightning's clipping\n"
            "    norm = float(torch.nn.utils.clip_grad_norm_(self.parameters(), "
            "float(\"inf\")))\n"
            + _skip_or_keep(p, "self.parameters()", "    "))


def _pl_anomaly(p: Params, fw: Facts) -> tuple[str, str]:
    return ("under Lightning the Trainer turns it on for the whole fit: "
            "Trainer(detect_anomaly=True)",
            "trainer = Trainer(..., detect_anomaly=True)  # slow: for a few steps; raises at "
            "the first NaN/Inf of the backward with the forward's traceback")


def _pl_assert_inputs(p: Params, fw: Facts) -> tuple[str, str]:
    cls = _cls(fw)
    return (f"under Lightning, at the start of {cls}.training_step",
            f"# at the start of {cls}.training_step(self, batch, batch_idx):\n"
            "x, y = batch\n"
            "assert torch.isfinite(x).all(), "
            "f\"non-finite input batch {batch_idx}: {(~torch.isfinite(x)).sum()} bad values\"")


def _pl_standardize(p: Params, fw: Facts) -> tuple[str, str]:
    cls = _cls(fw)
    return (f"under Lightning, in the Dataset or LightningDataModule that feeds {cls} (or at "
            "the start of its training_step and validation_step)",
            f"# at the start of {cls}.training_step (and validation_step); better in the "
            "Dataset or LightningDataModule,\n"
            "# with the training set's per-feature mean and std\n"
            "x, y = batch\n"
            f"x = (x - {p['mean']}) / {p['std']}")


def _pl_eval(p: Params, fw: Facts) -> tuple[str, str]:
    cls = _cls(fw)
    return (f"under Lightning, evaluate in {cls}.validation_step: Lightning calls eval() and "
            "torch.no_grad() around it, and train() afterwards",
            f"# in {cls}: Lightning runs validation_step in eval mode without gradients\n"
            "def validation_step(self, batch, batch_idx):\n"
            "    x, y = batch\n"
            "    self.log(\"val_loss\", loss_fn(self(x), y))\n"
            "# an evaluation elsewhere (a callback, training_step): self.eval() before it, "
            "self.train() after it")


LIGHTNING: dict[str, Render] = {
    "lower_learning_rate": _pl_lower_lr,
    "clip_grad_norm": _pl_clip,
    "hold_learning_rate": _pl_hold_lr,
    "adaptive_optimizer": _pl_adam,
    "guard_nonfinite_loss": _pl_guard,
    "skip_spiking_steps": _pl_skip,
    "detect_anomaly": _pl_anomaly,
    "assert_finite_inputs": _pl_assert_inputs,
    "standardize_inputs": _pl_standardize,
    "call_model_eval": _pl_eval,
}
"""PyTorch Lightning (``lightning.pytorch`` or ``pytorch_lightning``)."""


# --------------------------------------------------------------------------- Hugging Face
def _args(fw: Facts, key: str) -> Any:
    return (fw.get("args") or {}).get(key)


def _hf_lower_lr(p: Params, fw: Facts) -> tuple[str, str]:
    return (f"under the Hugging Face Trainer the rate is TrainingArguments' learning_rate: "
            f"{p['lr']}",
            f"args = TrainingArguments(..., learning_rate={p['lr']})  # was {p['old_lr']}")


def _hf_clip(p: Params, fw: Facts) -> tuple[str, str]:
    now = _args(fw, "max_grad_norm")
    return ("under the Hugging Face Trainer, TrainingArguments' max_grad_norm clips between "
            "the backward pass and the optimizer step",
            f"args = TrainingArguments(..., max_grad_norm={p['max_norm']})"
            + (f"  # now max_grad_norm={now}" if now is not None else ""))


def _hf_hold_lr(p: Params, fw: Facts) -> tuple[str, str]:
    now = _args(fw, "lr_scheduler_type")
    return ("under the Hugging Face Trainer the schedule is TrainingArguments' "
            f"lr_scheduler_type{f' (now {now})' if now else ''}: one with a floor keeps the "
            "rate from falling below it",
            "args = TrainingArguments(..., lr_scheduler_type=\"cosine_with_min_lr\",\n"
            f"                         lr_scheduler_kwargs={{\"min_lr\": {p['floor']}}})\n"
            "# or a constant rate after the warm-up: lr_scheduler_type=\"constant_with_warmup\"")


def _hf_adam(p: Params, fw: Facts) -> tuple[str, str]:
    return ("under the Hugging Face Trainer the optimizer is TrainingArguments' optim",
            "args = TrainingArguments(..., optim=\"adamw_torch\", learning_rate=1e-3)")


def _hf_guard(p: Params, fw: Facts) -> tuple[str, str]:
    return ("under the Hugging Face Trainer, a callback drops the step's gradients before "
            "the optimizer step (the optimizer skips a parameter without a gradient)",
            "from transformers import TrainerCallback\n"
            "class SkipNonFiniteStep(TrainerCallback):\n"
            "    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):\n"
            "        grads = [p.grad for p in model.parameters() if p.grad is not None]\n"
            "        if not all(torch.isfinite(g).all() for g in grads):\n"
            "            for p in model.parameters():\n"
            "                p.grad = None  # no update for this step\n"
            "trainer = Trainer(..., callbacks=[SkipNonFiniteStep()])")


def _hf_skip(p: Params, fw: Facts) -> tuple[str, str]:
    return ("under the Hugging Face Trainer, which clips before its callbacks see the "
            "gradients, a callback records each gradient's norm as backward() leaves it and "
            "drops a spiking step's gradients before the optimizer step",
            "import collections, statistics\n"
            "from transformers import TrainerCallback\n"
            "class SkipSpikingSteps(TrainerCallback):\n"
            "    def on_train_begin(self, args, state, control, model=None, **kwargs):\n"
            f"        self.raw, self.recent = {{}}, collections.deque(maxlen={p['window']})\n"
            "        for q in model.parameters():\n"
            "            if q.requires_grad:  # the norm before the Trainer's clipping\n"
            "                q.register_post_accumulate_grad_hook(\n"
            "                    lambda q: self.raw.__setitem__(q, q.grad.norm()))\n"
            "    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):\n"
            "        norm = float(torch.stack(list(self.raw.values())).norm())\n"
            "        self.raw.clear()\n"
            + _skip_or_keep(p, "model.parameters()", "        ")
            + "\ntrainer = Trainer(..., callbacks=[SkipSpikingSteps()])")


def _hf_anomaly(p: Params, fw: Facts) -> tuple[str, str]:
    return ("under the Hugging Face Trainer, TrainingArguments(debug=\"underflow_overflow\") "
            "names the first module whose inputs or outputs hold inf/NaN",
            "args = TrainingArguments(..., debug=\"underflow_overflow\")  # reports the module "
            "and the frames before it\n"
            "# or the backward's traceback: torch.autograd.set_detect_anomaly(True) before "
            "trainer.train()")


TRANSFORMERS: dict[str, Render] = {
    "lower_learning_rate": _hf_lower_lr,
    "clip_grad_norm": _hf_clip,
    "hold_learning_rate": _hf_hold_lr,
    "adaptive_optimizer": _hf_adam,
    "guard_nonfinite_loss": _hf_guard,
    "skip_spiking_steps": _hf_skip,
    "detect_anomaly": _hf_anomaly,
}
"""The Hugging Face ``transformers.Trainer`` and its ``TrainingArguments``."""

FRAMEWORKS: dict[str, dict[str, Render]] = {"lightning": LIGHTNING, "transformers": TRANSFORMERS}
"""Per framework (``facts["framework"]["name"]``): remedy id -> its rendering."""


def render(remedy: Remedy, framework: Facts | None) -> Remedy:
    """``remedy`` (text and code filled) in the terms of ``framework``: a copy with the
    framework's code and one more sentence, or ``remedy`` itself where the framework's
    table has no entry for it (or no framework trains the model)."""
    table = FRAMEWORKS.get(str((framework or {}).get("name")), {})
    rendering = table.get(remedy.id)
    if rendering is None or framework is None:
        return remedy
    try:
        sentence, code = rendering(remedy.params, framework)
    except (KeyError, TypeError, ValueError, IndexError):  # parameters it cannot read
        return remedy
    return dataclasses.replace(remedy, text=f"{remedy.text}; {sentence}", code=code)
