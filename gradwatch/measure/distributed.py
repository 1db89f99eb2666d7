"""Several processes (``torch.distributed``): which rank this is, and what the ranks combine.

Every rank measures its own steps. On each *cadence* flush (the one at every multiple of
``sync_every`` steps, which every rank of a lockstep DDP/FSDP loop reaches the same number
of times) the :class:`Distributed` extension makes one ``all_gather`` of one packed float64
row per rank, on a gloo group of its own created with a short timeout (``TIMEOUT_S``), never
the user's group. The row holds: the rank, the window's last step, the rank's first
non-finite loss and gradient steps so far, its loss at each step of the window, and, for
sharded parameters (FSDP2's DTensors), each rank's local norms of its shard, from which the
true global norms are written back before the rows reach ``History``.

Flushes at the end of a run (and after an exception) make no collective: a rank that raised
never arrives. Instead each rank leaves a summary of its whole run (status, error, steps,
first non-finite steps, last loss) in the process group's store, under a key of its own, and
rank 0 waits at most ``END_WAIT_S`` for the others' before it writes the report; a rank that
never leaves one is named as missing. A collective that fails or times out turns the
exchange off for the rest of the run (``facts["distributed"]["local_only"]`` says why).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
import warnings
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .extension import Extension

__all__ = ["END_WAIT_S", "TIMEOUT_S", "Distributed", "is_sharded", "local", "process_rank",
           "unwrap_parallel"]

TIMEOUT_S = float(os.environ.get("GRADWATCH_DIST_TIMEOUT", "120"))
END_WAIT_S = float(os.environ.get("GRADWATCH_DIST_END_WAIT", "15"))
_NORMS = ("grad", "grad_applied", "weight", "update")
_HEADER = 5  # rank, last step of the window, first non-finite loss step, gradient step,
# the detail interval the rank proposes for the next window (cadence.py)
_RUNS = itertools.count()  # distributed monitors of this process, in the same order on all


def process_rank() -> int:
    """This process's global rank: the process group's when one is initialised, else the
    ``RANK`` (or ``LOCAL_RANK``) a launcher such as ``torchrun`` set, else 0."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var, "")
        if value.strip().isdigit():
            return int(value)
    return 0


def unwrap_parallel(module: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` wrapper trains (``DataParallel`` is left as
    it is: on several GPUs its forward runs replicas, never the module itself)."""
    if type(module).__name__ == "DistributedDataParallel":
        inner = getattr(module, "module", None)
        if isinstance(inner, nn.Module):
            return inner
    return module


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor with a shard placement (an FSDP2 parameter or its gradient)."""
    return any(type(p).__name__ == "Shard" or getattr(p, "is_shard", lambda: False)()
               for p in getattr(t, "placements", ()))


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (no communication), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) and hasattr(t, "placements") else t


def _poll(store: Any, key: str, wait_s: float) -> bool:
    """Whether ``key`` is in the store within ``wait_s`` seconds. Polled with ``check``,
    never ``wait``: a timed-out ``wait`` leaves a waiter behind in the store's server, which
    has made another rank's process abort at its exit."""
    deadline = time.monotonic() + wait_s
    try:
        while not store.check([key]):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True
    except Exception:
        return False


def _first(mask: np.ndarray, steps: np.ndarray) -> int | None:
    hits = np.nonzero(mask)[0]
    return int(steps[hits[0]]) if hits.size else None


def _min(a: int | None, b: int | None) -> int | None:
    return b if a is None else (a if b is None else min(a, b))


def _code(step: int | None) -> float:
    return -1.0 if step is None else float(step)


def _step(value: float) -> int | None:
    return None if value < 0 or not math.isfinite(value) else int(value)


class Distributed(Extension):
    """The ranks' exchange: one collective per cadence flush, a store summary at the end."""

    def __init__(self) -> None:
        self.world, self.rank, self.backend = 1, process_rank(), None
        self.group: Any = None
        self.store: Any = None
        self.local_only: str | None = None  # why the ranks stopped combining
        self.exchanges, self.until, self.exchange_s = 0, None, 0.0
        self.first: dict[str, int | None] = {"loss": None, "grad": None}  # this rank's
        self.ranks: dict[int, dict[str, Any]] = {}
        self.spread: dict[str, Any] = {"max_relative": 0.0, "step": None}
        self.act_spread: dict[str, Any] = {"max_relative": 0.0, "layer": None}
        self.run_id: int | None = None

    # ------------------------------------------------------------------ detection
    def _see(self) -> bool:
        """Whether a process group of several ranks is (or was) up. Checked lazily, at
        every root forward until one is seen: the script may call ``init_process_group``
        after gradwatch started. No communication."""
        if self.world > 1:
            return True
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return False
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.backend, self.run_id = str(dist.get_backend()), next(_RUNS)
        try:  # kept: the end summaries go through it, also after destroy_process_group
            self.store = dist.distributed_c10d._get_default_store()
            self.store.set(self._key("here", self.rank), "1")  # this rank is watched
        except Exception:
            self.store = None
        self._write_facts()
        return True

    def _key(self, what: str, rank: int) -> str:
        return f"gradwatch/{self.run_id}/{what}/{rank}"

    def _watched(self, rank: int, wait_s: float) -> bool:
        """Whether ``rank`` runs gradwatch too (a script may watch on rank 0 only)."""
        return _poll(self.store, self._key("here", rank), wait_s)

    def _group(self) -> Any:
        """gradwatch's own gloo group, created at the first cadence flush (all ranks reach
        it together): a missing peer costs TIMEOUT_S, not a hang, and the user's groups are
        never used."""
        if self.group is None and self.local_only is None:
            # Every rank's first forward came before the first all-reduce of its gradients,
            # so in a DDP/FSDP loop all have announced themselves by now: the wait is short.
            absent = [r for r in range(self.world) if self.store is None or
                      not self._watched(r, min(5.0, TIMEOUT_S))]
            if absent:
                self.local_only = (f"rank(s) {', '.join(map(str, absent))} run no gradwatch "
                                   f"(or no store): the ranks are not combined")
                return None
            try:
                self.group = dist.new_group(backend="gloo",
                                            timeout=timedelta(seconds=TIMEOUT_S))
            except Exception as exc:
                self.local_only = f"no gloo group: {type(exc).__name__}: {exc}"[:300]
        return self.group

    def on_root_forward_pre(self, module: nn.Module, args: tuple[Any, ...],
                            kwargs: dict[str, Any]) -> None:
        if self.world < 2:
            self._see()

    # ------------------------------------------------------------------ flushes
    def on_rows(self, steps: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        """Rows of a flush, before History gets them (device encoding: -1 = unmeasured)."""
        m = self.monitor
        n = len(steps)
        seen = np.array(m.buffers.loss_seen[:n], dtype=bool)
        self.first["loss"] = _min(self.first["loss"],
                                  _first(seen & ~np.isfinite(arrays["loss"]), steps))
        self.first["grad"] = _min(self.first["grad"],
                                  _first((~np.isfinite(arrays["grad"])).any(axis=1), steps))
        every = m.options.sync_every
        if m.ending is not None or m.step % every or self.local_only or not self._see() \
                or not dist.is_initialized() or self._group() is None:
            return
        sharded = self._sharded_slots(arrays["grad"].shape[1])
        start = m.step - every
        pos = steps - start
        inside = (pos >= 0) & (pos < every)
        losses = np.full(every, np.nan)
        losses[pos[inside]] = arrays["loss"][inside]
        norms = np.full((len(_NORMS), every, len(sharded)), -1.0)
        for k, key in enumerate(_NORMS):
            norms[k][pos[inside]] = arrays[key][inside][:, sharded]
        act = arrays["act"][inside]  # layer output RMS on detail steps (-1: not measured)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a layer never measured: NaN
            act_mean = np.nanmean(np.where(act == -1.0, np.nan, act), axis=0) if len(act) \
                else np.full(act.shape[1], np.nan)
        header = [self.rank, m.step - 1, _code(self.first["loss"]), _code(self.first["grad"]),
                  m.cadence.proposed]
        row = torch.from_numpy(np.concatenate([header, losses, act_mean, norms.ravel()]))
        started = time.perf_counter()
        try:
            rows = [torch.empty_like(row) for _ in range(self.world)]
            dist.all_gather(rows, row, group=self.group)  # the one collective of the flush
        except Exception as exc:
            self.local_only = (f"the exchange at step {m.step} failed, the ranks measure "
                               f"alone from there: {type(exc).__name__}: {exc}")[:400]
            self._write_facts()
            return
        self.exchange_s += time.perf_counter() - started
        table = torch.stack(rows).numpy()
        m.cadence.proposed = int(table[:, 4].max())  # every rank measures the same steps
        self._combine(table, start, every, len(act_mean))
        if len(sharded):
            every_rank = table[:, _HEADER + every + len(act_mean):].reshape(
                self.world, len(_NORMS), every, -1)
            rows_in = np.nonzero(inside)[0]
            for k, key in enumerate(_NORMS):
                arrays[key][np.ix_(rows_in, sharded)] = self._global(every_rank[:, k])[
                    pos[inside]]
        self.exchanges, self.until = self.exchanges + 1, m.step - 1
        self._write_facts()

    def _sharded_slots(self, width: int) -> np.ndarray:
        watched = self.monitor.watched
        out = []
        for slot in range(min(width, watched.slots)):
            p = watched.param(slot)
            if p is not None and is_sharded(p):
                out.append(slot)
        return np.asarray(out, dtype=np.int64)

    @staticmethod
    def _global(values: np.ndarray) -> np.ndarray:
        """Norms of every rank's shard (rank, step, slot) -> the whole tensor's norm."""
        unmeasured = (values == -1.0).any(axis=0)
        with np.errstate(invalid="ignore", over="ignore"):
            total = np.sqrt(np.sum(values ** 2, axis=0))
        total[unmeasured] = -1.0
        return total

    def _combine(self, table: np.ndarray, start: int, every: int, layers: int) -> None:
        losses = table[:, _HEADER:_HEADER + every]
        act = table[:, _HEADER + every:_HEADER + every + layers]
        steps = np.arange(start, start + every)
        for r in range(self.world):
            rank = int(table[r, 0])
            info = self.ranks.setdefault(rank, {"rank": rank})
            info["first_nonfinite_loss"] = _step(table[r, 2])
            info["first_nonfinite_grad"] = _step(table[r, 3])
            if np.isfinite(act[r]).any():  # this window's mean layer output RMS, per layer
                info["act_rms"] = [None if not math.isfinite(v) else round(float(v), 6)
                                   for v in act[r]]
                info["act_rms_window_end"] = start + every - 1
            ok = np.isfinite(losses[r])
            if ok.any():
                info["last_loss"] = float(losses[r][ok][-1])
                info["last_loss_step"] = int(steps[ok][-1])
        both = np.isfinite(act).all(axis=0) & (np.abs(act).mean(axis=0) > 0)
        if both.any():  # the layer whose output scale differs most between the ranks
            rel = np.ptp(act[:, both], axis=0) / np.abs(act[:, both]).mean(axis=0)
            i = int(np.argmax(rel))
            if float(rel[i]) > self.act_spread["max_relative"]:
                layer = int(np.nonzero(both)[0][i])
                names = self.monitor.history.layers
                self.act_spread = {"max_relative": float(rel[i]), "window_end":
                                   start + every - 1, "layer": names[layer].name
                                   if layer < len(names) else layer}
        all_ok = np.isfinite(losses).all(axis=0)
        if all_ok.any():
            mean = np.abs(losses[:, all_ok].mean(axis=0))
            rel = (np.ptp(losses[:, all_ok], axis=0)) / np.where(mean > 0, mean, 1.0)
            i = int(np.argmax(rel))
            if float(rel[i]) > self.spread["max_relative"]:
                self.spread = {"max_relative": float(rel[i]), "step": int(steps[all_ok][i])}

    # ------------------------------------------------------------------ the end
    def finish(self) -> None:
        """Each rank leaves its summary in the store; rank 0 reads the others' (waiting at
        most END_WAIT_S). No collective: a rank that raised may never get here."""
        if not self._see():
            return
        m = self.monitor
        status, error = m.ending or ("completed", None)
        mine = {"rank": self.rank, "status": status, "error": error, "steps": m.step,
                "first_nonfinite_loss": self.first["loss"],
                "first_nonfinite_grad": self.first["grad"],
                "last_loss": m.history.events.last_loss,
                "last_loss_step": m.history.events.last_loss_step}
        self.ranks[self.rank] = {**self.ranks.get(self.rank, {}), **mine}
        store = self.store
        if store is not None:
            prefix = f"gradwatch/{self.run_id}/end/"
            try:
                store.set(prefix + str(self.rank), json.dumps(mine))
                if self.rank == 0:
                    self._read_ends(store, prefix)
            except Exception as exc:
                self.ranks[self.rank]["end_exchange"] = f"{type(exc).__name__}: {exc}"[:300]
        self._write_facts(final=True)
        # Nothing of torch.distributed outlives the watch: a group or store kept until the
        # interpreter exits is torn down after the script's destroy_process_group.
        self.group = self.store = None

    def _read_ends(self, store: Any, prefix: str) -> None:
        missing = []
        for r in range(1, self.world):
            if not self._watched(r, 0.0):
                missing.append(r)  # never watched: no summary will come
                continue
            try:
                if not _poll(store, prefix + str(r), END_WAIT_S):
                    raise TimeoutError(prefix + str(r))
                got = json.loads(store.get(prefix + str(r)).decode())
                self.ranks[r] = {**self.ranks.get(r, {}), **got}
            except Exception:
                missing.append(r)
        if missing:
            self.ranks_missing = missing

    # ------------------------------------------------------------------ facts
    def _write_facts(self, final: bool = False) -> None:
        """``history.facts["distributed"]``: what the judge reads (numbers, no torch)."""
        if self.world < 2:
            return
        ranks = [self.ranks[r] for r in sorted(self.ranks)]
        firsts = []
        for info in ranks:
            for what in ("loss", "grad"):
                step = info.get(f"first_nonfinite_{what}")
                if step is not None:
                    firsts.append((step, 0 if what == "loss" else 1, info["rank"], what))
        first = None
        if firsts:
            step, _, rank, what = min(firsts)
            first = {"rank": rank, "step": step, "what": "loss" if what == "loss" else
                     "gradient", "ranks": sorted({f[2] for f in firsts if f[0] == step and
                                                  f[3] == what})}
        self.monitor.history.facts["distributed"] = {
            "world_size": self.world, "rank": self.rank, "backend": self.backend,
            "exchanges": self.exchanges, "combined_until_step": self.until,
            "exchange_s": round(self.exchange_s, 6),
            "every": self.monitor.options.sync_every, "local_only": self.local_only,
            "final": final, "ranks": ranks, "first_nonfinite": first,
            "ranks_missing": getattr(self, "ranks_missing", []),
            "failed_ranks": [i["rank"] for i in ranks if i.get("status") == "failed"],
            "loss_spread": self.spread, "act_rms_spread": self.act_spread}
