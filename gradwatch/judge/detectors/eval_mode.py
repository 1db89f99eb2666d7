"""eval_mode: a model run without gradients while Dropout or BatchNorm were in training mode.

Reads the facts of ``measure/extensions/evalmode.py`` (``facts["eval_mode"]``, one entry per
model). Severity:

* warning: the output of the first such forward differs from eval mode by more than
  ``eval_mode_output_change`` (relative L2), or the BatchNorm running statistics changed
  by more than ``eval_mode_bn_change`` over the first pass, or the output could not be
  measured (the forward could not be re-run) while Dropout or BatchNorm layers trained:
  with p > 0 or running statistics they change the result by construction;
* info: the layers were in training mode but neither difference is measurable (a tiny
  dropout rate, running statistics that do not move);
* nothing: a model without Dropout/BatchNorm whose eval-mode output is the same.

Forwards that come one at a time inside most training steps (a target or teacher network,
a training-metric pass) are still reported, with a cause that says where they run, since
training mode may be intended there.
"""

from __future__ import annotations

import math
from typing import Any

from ...findings import Cause, Finding, Remedy
from ..advice import remedy
from ..causes import span
from ..context import Context, fmt

KIND = "eval_mode"
WHOLE_RUN = True  # its facts are per model already, and cover models only evaluated
CAUSES = ("dropout_active_in_eval", "batchnorm_stats_updated_by_eval",
          "training_mode_code_in_eval", "no_grad_forward_inside_training_step")
"""The ids of the causes this detector names besides the shared ones of ``causes.py``."""


def detect(ctx: Context) -> list[Finding]:
    per_root: dict[str, Any] = ctx.facts.get("eval_mode") or {}
    several = len({layer.root for layer in ctx.h.layers if layer.root >= 0}) > 1 or \
        len(per_root) > 1
    findings = []
    for key in sorted(per_root, key=int):
        if ctx.root is not None and int(key) != ctx.root:
            continue
        finding = _judge(ctx, per_root[key], several)
        if finding is not None:
            findings.append(finding)
    return findings


def _judge(ctx: Context, f: dict[str, Any], several: bool) -> Finding | None:
    t = ctx.t
    n = int(f.get("forwards") or 0)
    if not n:
        return None
    measured = f.get("measured") or {}
    rel = measured.get("output_rel_diff")
    rel = float(rel) if isinstance(rel, (int, float)) else None
    output_differs = rel is not None and not math.isnan(rel) and rel > t.eval_mode_output_change
    if f.get("generic") and not output_differs:
        return None  # no mode-dependent module, and the mode changes nothing
    bn = f.get("batchnorm") or {}
    change = bn.get("first_pass_change", bn.get("first_forward_change"))
    change = float(change) if isinstance(change, (int, float)) else None
    bn_updated = change is not None and not math.isnan(change) and change > t.eval_mode_bn_change
    unmeasured = rel is None or math.isnan(rel)
    dropout, norms = f.get("dropout_layers") or [], f.get("batchnorm_layers") or []
    warn = output_differs or bn_updated or (unmeasured and bool(dropout or norms))
    model = f.get("root") or "model"
    prefix = f"{model}." if several else ""
    layers = [f"{prefix}{name}" for name in f.get("layers_in_training") or []]

    causes: list[Cause] = [c for c in (
        dropout_active_in_eval(ctx, f), batchnorm_stats_updated_by_eval(ctx, f),
        training_mode_code_in_eval(ctx, f), no_grad_forward_inside_training_step(ctx, f),
    ) if c is not None]
    var = _variable(f)
    remedies: list[Remedy] = [remedy("call_model_eval", model=var)]
    if norms and (bn_updated or change is None):
        remedies.append(remedy("recompute_bn_statistics", model=var))

    evidence: dict[str, Any] = {
        "model": model,
        "no_grad_forwards_in_training_mode": n,
        "inference_mode_forwards": f.get("inference_mode_forwards", 0),
        "first_step": f.get("first_step"),
        "last_step": f.get("last_step"),
        "steps_with_such_forwards": f.get("steps_with_forwards"),
        "passes": f.get("passes"),
        "longest_pass": f.get("longest_pass"),
        "dropout_layers": dropout,
        "batchnorm_layers": norms,
        "other_layers": f.get("other_layers") or [],
        "measured_at_step": measured.get("step"),
        "rerun": measured.get("rerun"),
        "output_rel_diff": rel,
        "output_max_abs_diff": measured.get("output_max_abs_diff"),
        "batchnorm_stats_updated": bn_updated,
    }
    if "argmax_agreement" in measured:
        evidence["argmax_agreement"] = measured["argmax_agreement"]
    if measured.get("reason"):
        evidence["rerun_note"] = measured["reason"]
    if not f.get("keyword_arguments_seen", True):
        evidence["rerun_without_keyword_arguments"] = True
    for key in ("momentum", "first_forward_change", "first_pass_change", "first_pass_forwards",
                "num_batches_tracked_before", "num_batches_tracked_after"):
        if key in bn:
            evidence[f"bn_{key}"] = bn[key]
    share = eval_share(f) if norms else None
    if share is not None:
        evidence["bn_share_from_longest_pass"] = share

    return Finding(KIND, "warning" if warn else "info", int(f.get("first_step") or 0),
                   int(f.get("last_step") or 0), layers,
                   ctx.subject + _summary(f, n, rel, measured, dropout, norms, change, bn),
                   evidence, causes, remedies)


def _summary(f: dict[str, Any], n: int, rel: float | None, measured: dict[str, Any],
             dropout: list[dict[str, Any]], norms: list[dict[str, Any]],
             change: float | None, bn: dict[str, Any]) -> str:
    model = f.get("root") or "the model"
    inference = int(f.get("inference_mode_forwards") or 0)
    how = "torch.inference_mode()" if inference == n else \
        "torch.no_grad()" if not inference else "torch.no_grad()/inference_mode()"
    kinds = [f"{len(rows)} {label}{'s' if len(rows) > 1 else ''}"
             for rows, label in ((dropout, "Dropout layer"), (norms, "BatchNorm layer"))
             if rows]
    other = f.get("other_layers") or []
    if other:
        kinds.append(f"{len(other)} other random layer{'s' if len(other) > 1 else ''}")
    what = " and ".join(kinds) if kinds else "its modules"
    steps = f"at step {f['first_step']}" if f.get("first_step") == f.get("last_step") else \
        f"from step {f.get('first_step')} to {f.get('last_step')}"
    text = (f"{n} forward{'s' if n > 1 else ''} of {model} ran under {how} {steps} with {what} "
            f"in training mode")
    if rel is not None and not math.isnan(rel):
        agree = measured.get("argmax_agreement")
        agree_text = f", the predicted class agreed on {fmt(100 * agree)}% of the samples" \
            if isinstance(agree, (int, float)) else ""
        text += (f": the first one's output differs from the eval-mode output by "
                 f"{fmt(100 * rel)}% (relative L2; max abs difference "
                 f"{fmt(measured.get('output_max_abs_diff'))}{agree_text})")
    elif measured.get("rerun") in ("failed", "skipped", "incomparable"):
        text += (f" (its difference from eval mode was not measured: "
                 f"{measured.get('reason', measured.get('rerun'))})")
    if norms:
        passes = bn.get("first_pass_forwards")
        if change is not None and not math.isnan(change) and change > 0:
            text += (f"; each updated the BatchNorm running statistics with its batch "
                     f"(they changed by {fmt(100 * change)}% over the first pass"
                     + (f" of {passes} forwards)" if passes else ")"))
        else:
            text += "; the BatchNorm layers normalised with each batch's own statistics"
    return text + "."


def _variable(f: dict[str, Any]) -> str:
    """The model's variable name in the user's script, when the root was named after one."""
    name, type_name = str(f.get("root") or ""), str(f.get("type") or "")
    if name.isidentifier() and name.lower() != type_name.lower():
        return name
    return "model"


# ------------------------------------------------------------ this kind's causes
def _rates(rows: list[dict], key: str) -> str:
    values = sorted({r.get(key) for r in rows if r.get(key) is not None})
    if not values:
        return ""
    return f" ({key}={', '.join(fmt(v) for v in values[:4])})"


def _quoted(rows: list[dict]) -> str:
    """Module paths of layers without parameters, quoted: '3', 'encoder.dropout'."""
    return span([f"'{r['name']}'" for r in rows])


def dropout_active_in_eval(ctx: Context, facts: dict) -> Cause | None:
    """Dropout layers in training mode during forwards without gradient."""
    rows = facts.get("dropout_layers") or []
    if not rows:
        return None
    measured = facts.get("measured") or {}
    rel = measured.get("output_rel_diff")
    tail = ""
    if isinstance(rel, float) and not math.isnan(rel):
        tail = (f"; the first one's output differs from the eval-mode output by "
                f"{fmt(100 * rel)}% of the latter's norm")
    n = facts["forwards"]
    return Cause("dropout_active_in_eval",
                 f"the Dropout layer{'s' if len(rows) > 1 else ''} {_quoted(rows)}"
                 f"{_rates(rows, 'p')} stayed in training mode during {n} forward"
                 f"{'s' if n > 1 else ''} without gradient: dropout zeroes a random fraction "
                 f"p of the units and scales the rest by 1/(1-p), so every evaluation runs "
                 f"another random sub-network{tail}")


def batchnorm_stats_updated_by_eval(ctx: Context, facts: dict) -> Cause | None:
    """BatchNorm layers normalised no-grad batches with their own statistics and updated
    their running statistics with them."""
    rows = facts.get("batchnorm_layers") or []
    if not rows:
        return None
    bn = facts.get("batchnorm") or {}
    change = bn.get("first_pass_change", bn.get("first_forward_change"))
    parts = []
    if isinstance(change, float) and not math.isnan(change):
        n = bn.get("first_pass_forwards")
        over = f" over the first pass of {n} forward{'s' if n != 1 else ''}" if n else ""
        parts.append(f"the running statistics changed by {fmt(100 * change)}%{over}")
    before, after = bn.get("num_batches_tracked_before"), bn.get("num_batches_tracked_after")
    if before is not None and after is not None:
        parts.append(f"num_batches_tracked went from {before} to {after}")
    share = eval_share(facts)
    if share is not None:
        parts.append(f"with momentum {fmt(bn.get('momentum'))}, after a pass of "
                     f"{facts['longest_pass']} batches {fmt(100 * share)}% of the running "
                     f"statistics come from these batches")
    measured = "; ".join(parts)
    one = len(rows) == 1
    return Cause("batchnorm_stats_updated_by_eval",
                 f"the BatchNorm layer{'' if one else 's'} {_quoted(rows)} stayed in training "
                 f"mode: {'it' if one else 'they'} normalised each of these batches with the "
                 f"batch's own mean and variance instead of the running statistics, and "
                 f"updated the running statistics with it"
                 + (f" ({measured})" if measured else "")
                 + "; eval mode, and the saved model, use those statistics")


def eval_share(facts: dict) -> float | None:
    """Fraction of the BatchNorm running statistics that the longest no-grad pass wrote."""
    bn = facts.get("batchnorm") or {}
    momentum, n = bn.get("momentum"), facts.get("longest_pass", 0)
    if not n:
        return None
    if momentum is None:  # cumulative average: each batch weighs 1 / num_batches_tracked
        after = bn.get("num_batches_tracked_after")
        return min(1.0, n / after) if after else None
    return 1.0 - (1.0 - float(momentum)) ** n


def training_mode_code_in_eval(ctx: Context, facts: dict) -> Cause | None:
    """The output depends on the mode through code that is not a Dropout/BatchNorm module."""
    rows = facts.get("other_layers") or []
    rel = (facts.get("measured") or {}).get("output_rel_diff")
    if facts.get("generic") and isinstance(rel, float):
        return Cause("training_mode_code_in_eval",
                     f"the model has no Dropout or BatchNorm module, yet its output in "
                     f"training mode differs from eval mode by {fmt(100 * rel)}%: code "
                     f"in its forward depends on self.training (F.dropout(x, p, "
                     f"training=self.training), a DropPath, a custom module)")
    if rows:
        return Cause("training_mode_code_in_eval",
                     f"{_quoted(rows)} ({', '.join(sorted({r['type'] for r in rows}))}) "
                     f"stayed in training mode, where it is random (RReLU samples its "
                     f"negative slope per element)")
    return None


def no_grad_forward_inside_training_step(ctx: Context, facts: dict) -> Cause | None:
    """The no-grad forwards come one at a time, in most training steps."""
    total = ctx.h.total_steps
    steps = facts.get("steps_with_forwards", 0)
    if facts.get("longest_pass") != 1 or total < 4 or \
            steps < ctx.t.eval_mode_in_step_fraction * total:
        return None
    return Cause("no_grad_forward_inside_training_step",
                 f"the no-grad forwards come one at a time, in {steps} of the {total} "
                 f"training steps: they run inside the training loop (a target or teacher "
                 f"network, a training-metric pass, or a validation after every update). If "
                 f"training-mode behaviour is intended there, this is by design; otherwise "
                 f"the same remedies apply")
