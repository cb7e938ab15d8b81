"""Pick the fastest mix of strategies whose predicted peak fits a GPU, from estimates alone (no GPU needed).

Each candidate (precision x activation checkpointing x 8-bit optimizer state x int8 frozen base x micro-batch size)
gets a predicted peak and a predicted time per optimizer step (:mod:`lightning_lowvram.planner.timing`: FLOPs, bytes
and kernels of the traced step priced on the card); the fastest candidate that fits with the margin wins. To plan in
seconds, every precision x checkpointing setting is traced at micro-batches of 1 and 2 only: activation bytes, FLOPs
and bytes moved grow affinely with the micro-batch, so the peak (per phase) and the time of larger ones are
extrapolated; the chosen candidate is then traced at its own size to confirm it fits (if not, the next one is
tried). The plain setup (the whole batch, float32) is traced as it is. 8-bit optimizer state (torchao, Adam/AdamW)
and an int8 weight-only frozen base are modelled from the same traces: their bytes replace the float ones; their
step time is the float one's (8-bit AdamW measured 1.00x on an H200, ANCHORS.md; the int8 base is not measured).
For a Hugging Face causal LM whose head and loss it reproduces, every setting but the plain one is traced with the
chunked cross-entropy (ChunkedCrossEntropyCallback); when nothing fits, checkpointing with the blocks' inputs in
host memory is tried too (its PCIe copies charged at ``GPUProfile.pcie_gbs``, no overlap assumed), and when that does
not fit either, with the blocks' MLPs tiled along the sequence as well (:mod:`lightning_lowvram.cores.tiled_mlp`,
traced).

Across ``devices`` cards each setting is also tried under DDP, FSDP2 ``grad_op`` and FSDP2 ``full`` (least traffic
first), and FSDP2 with CPU offload when nothing fits on the cards: peaks per rank (``estimate_step_memory`` with
``devices``: FSDP2 traced over a fake process group), host memory apart, collectives and offload copies priced by
:class:`~lightning_lowvram.planner.timing.Traffic` (unmeasured on GPUs). The chosen setting comes with its Trainer
kwargs (``strategy="ddp"`` or an ``FSDP2Strategy``, ``devices``) and Hydra overrides.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

from torch import nn

from lightning_lowvram._progress import Progress, progress
from lightning_lowvram.cores.batches import batch_size_of
from lightning_lowvram.cores.chunked_cross_entropy_hf import is_chunkable
from lightning_lowvram.memory.profiles import GPUProfile, format_bytes, gpu_profile
from lightning_lowvram.planner.estimate import (
    PRECISIONS,
    MemoryEstimate,
    estimate_step_memory,
    parameter_bytes,
)
from lightning_lowvram.planner.timing import Traffic, rates_of, traffic_of
from lightning_lowvram.registry import StepContext, Strategy, get, settings_of, strategies

Options = tuple[tuple[str, Any], ...]  # (strategy name, value) of the registry's strategies the search enumerates


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One setting and its predicted peak."""

    precision: str
    micro_batch_size: int
    activation_checkpointing: bool
    estimate: MemoryEstimate
    fits: bool
    step_time: float  # predicted seconds per optimizer step on the card
    traced: bool = True  # traced at this micro-batch size (else extrapolated from sizes 1 and 2)
    devices: int = 1
    sharding: str = "none"  # "none" (one card, or DDP), "full" / "grad_op" (FSDP2Strategy's reshard_after_forward)
    offload: str = "none"  # "params": FSDP2's CPU offload (FSDP2Strategy(cpu_offload=True))
    chunked_ce: bool = False  # a HF causal LM's head and loss in chunks (ChunkedCrossEntropyCallback)
    offload_activations: bool = False  # checkpointed blocks' inputs in host memory (ActivationCheckpointingCallback)
    tiled_mlp: bool = False  # the blocks' MLPs a tile of the sequence at a time (ActivationCheckpointingCallback)
    options: Options = ()  # the values of the strategies the search enumerates (8-bit state, a low-bit base...)

    @property
    def optimizer_8bit(self) -> bool:
        """Adam/AdamW state in 8 bits (EightBitOptimizerCallback)."""
        return bool(dict(self.options).get("optimizer_8bit", False))

    @property
    def base_bits(self) -> int:
        """0: the frozen base as it is; 16, 8 or 4: stored in that many bits (LowBitBaseCallback)."""
        return int(dict(self.options).get("low_bit_base", 0))

    @property
    def int8_base(self) -> bool:
        """The frozen base in int8 (``base_bits == 8``)."""
        return self.base_bits == 8

    @property
    def checkpointing(self) -> Ckpt:
        """``False``, ``True``, ``"offload"`` (inputs in host memory) or ``"tiled"`` (and the MLPs tiled)."""
        if self.tiled_mlp:
            return "tiled"
        return "offload" if self.offload_activations else self.activation_checkpointing

    def settings(self, batch_size: int | None = None) -> dict[str, Any]:
        """Every strategy's value in this setting, by registry name (micro-batching when ``batch_size`` splits)."""
        values: dict[str, Any] = {
            "micro_batch": self.micro_batch_size if batch_size and self.micro_batch_size < batch_size else None,
            "activation_checkpointing": self.checkpointing,
            "chunked_cross_entropy": self.chunked_ce,
            "fsdp2": (self.sharding, self.offload),
        }
        return values | dict(self.options)

    @property
    def layout(self) -> str:
        """Where the state lives: ``""`` (one card), ``"DDP x4"``, ``"FSDP2 x4"``, ``"FSDP2 + CPU offload"``..."""
        if self.sharding == "none":
            return f"DDP x{self.devices}" if self.devices > 1 else ""
        name = "FSDP2" if self.sharding == "full" else "FSDP2 grad_op"
        name += f" x{self.devices}" if self.devices > 1 else ""
        return name + (" + CPU offload" if self.offload != "none" else "")

    @property
    def label(self) -> str:
        parts = [self.layout] if self.layout else []
        parts += [self.precision, f"micro-batch {self.micro_batch_size}"]
        parts += [strategy.label(value) for strategy, value in settings_of(self.settings())]
        return ", ".join(p for p in parts if p)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The candidates tried (plain setup first), the chosen one (``None``: nothing fits) and the card."""

    gpu: GPUProfile
    batch_size: int
    budget: int
    candidates: list[Candidate]
    chosen: Candidate | None
    skipped: tuple[str, ...] = ()  # settings not traced because they cannot be faster than one that fits
    devices: int = 1

    def table(self) -> str:
        """The candidates as text, the chosen one marked; peaks are tensor bytes (the context allowance apart)."""
        fastest = min((c.step_time for c in self.candidates if c.fits), default=None)
        cards = f"{self.devices} x {self.gpu.name}, per rank" if self.devices > 1 else self.gpu.name
        host = any(c.estimate.host for c in self.candidates)
        width = max(58, *(len(c.label) + 2 for c in self.candidates))
        lines = [
            f"plan for {cards}: tensors must stay under {format_bytes(self.budget)} (the card minus its "
            f"context, with margin); batch {self.batch_size}{' a rank' if self.devices > 1 else ''} kept",
            f"  {'':2}{'setting':{width}} {'tensor peak':>12}"
            + (f" {'host':>10}" if host else "")
            + f" {'fits':>5} {'s/step':>8} {'vs best':>8}",
        ]
        for c in self.candidates:
            mark = "->" if c is self.chosen else ""
            fits = "yes" if c.fits else "no"
            versus = f"{c.step_time / fastest:.2f}x" if fastest else "-"
            how = "" if c.traced else " ~"
            peak = format_bytes(tensor_peak(c)) + (f" {format_bytes(c.estimate.host):>10}" if host else "")
            lines.append(f"  {mark:2}{c.label + how:{width}} {peak:>12} {fits:>5} {c.step_time:>8.3f} {versus:>8}")
        lines.append(
            "  (~: extrapolated from micro-batches of 1 and 2; the others traced; s/step: predicted"
            + ("; host: host memory a rank needs for offloaded state" if host else "")
            + ")"
        )
        if self.skipped:
            lines.append(f"  not traced, cannot be faster than one that fits: {'; '.join(self.skipped)}")
        if self.chosen is None:
            lines.append(f"  {self.nothing_fits()}")
        return "\n".join(lines)

    def nothing_fits(self) -> str:
        """Why nothing fits and what to try next: the smallest peak tried, the budget, the card it needs."""
        smallest = min(self.candidates, key=tensor_peak)
        need = format_bytes(int(tensor_peak(smallest) / (self.budget / self.gpu.usable_bytes)))
        return (
            f"nothing fits: the smallest predicted tensor peak is {format_bytes(tensor_peak(smallest))} "
            f"({smallest.label}) against {format_bytes(self.budget)}; it needs a card with {need} for tensors, "
            f"more cards (FSDP2: devices={2 * self.devices}), or fewer parameters (PruningCallback)"
            + ("" if any(c.base_bits for c in self.candidates) else " or a low-bit frozen base (LowBitBaseCallback)")
        )

    def settings(self) -> list[tuple[Strategy, Any]]:
        """The chosen setting's strategies and their values, in registry order (none if nothing fits)."""
        return [] if self.chosen is None else list(settings_of(self.chosen.settings(self.batch_size)))

    def trainer_kwargs(self) -> dict[str, Any]:
        """Trainer arguments of the chosen setting: precision, and the strategy object and devices when it spans cards.

        Example:
            >>> # lightning.Trainer(callbacks=plan_callbacks(p), **p.trainer_kwargs())

        """
        if self.chosen is None:
            return {}
        kwargs: dict[str, Any] = {"precision": self.chosen.precision}
        for strategy, value in self.settings():
            if strategy.kind == "trainer_strategy":
                kwargs |= {"strategy": strategy.build(value), "devices": self.chosen.devices}
        if "strategy" not in kwargs and self.chosen.devices > 1:
            kwargs |= {"strategy": "ddp", "devices": self.chosen.devices}
        return kwargs

    def overrides(self) -> list[str]:
        """The same as Hydra overrides of the `lowvram` app."""
        if self.chosen is None:
            return []
        chosen = self.settings()
        nodes = [get("memory_report").node] + [s.node for s, _ in chosen if s.kind == "callback"]
        out = [f"trainer.precision={self.chosen.precision}", f"callbacks=[{','.join(nodes)}]"]
        out += [line for strategy, value in chosen for line in strategy.override_lines(value)]
        c = self.chosen
        if c.devices > 1:
            out += [f"trainer.devices={c.devices}"] + ([] if c.sharding != "none" else ["+trainer.strategy=ddp"])
        return out


def tensor_peak(candidate: Candidate) -> int:
    """A candidate's predicted tensor peak: the estimate without the card's context allowance."""
    return candidate.estimate.peak - candidate.estimate.allowance


Layout = tuple[str, str]  # (sharding, offload)
# activation checkpointing: False, True, "offload" (with the blocks' inputs in host memory) or "tiled" (offload and
# the blocks' MLPs tiled along the sequence)
Ckpt = bool | str


def plan(
    module: nn.Module,
    batch: Any,
    gpu: str | GPUProfile,
    *,
    devices: int = 1,
    allow_offload: bool = True,
    margin: float = 0.1,
    allow_int8_base: bool = False,
    allow_low_bit_base: bool = False,
    precisions: tuple[str, ...] | list[str] | None = None,
    allow_chunked_ce: bool = True,
    allow_bf16_base: bool = True,
    **strategy_options: Any,
) -> Plan:
    """Choose the fastest setting whose predicted peak fits ``gpu`` with ``margin``; the effective batch is kept.

    Args:
        module: The LightningModule (its ``training_step`` and ``configure_optimizers``).
        batch: A training batch as the loader yields it (its size is the batch kept); with ``devices`` > 1, one
            rank's batch.
        gpu: A card profile or its name.
        devices: Cards of that kind. With more than one, each setting is also tried under DDP, FSDP2 with parameters
            kept between forward and backward (``grad_op``) and FSDP2 resharding them (``full``), in that order of
            traffic; the peaks are per rank (``estimate_step_memory(devices=...)``) and the step time charges the
            collectives at ``GPUProfile.interconnect_gbs`` (:mod:`.timing`). The 8-bit optimizer and a low-bit base
            are tried without FSDP2 only (not modelled sharded).
        allow_offload: When nothing fits on the cards, also try FSDP2 with CPU offload (sharded parameters,
            gradients and optimizer state in host memory, the optimizer step on the CPU; on one card too), its copies
            charged at ``GPUProfile.pcie_gbs`` (a profile without it skips offload); its host memory is in
            ``estimate.host``.
        margin: Fraction of the card's tensor memory kept free.
        allow_int8_base: Frozen Linear layers (``requires_grad=False``) may be stored int8 (weight-only), as
            ``LowBitBaseCallback(bits=8)`` does; off by default because it changes the base's numerics.
        allow_low_bit_base: Frozen Linear layers may be stored in 8 or 4 bits (NF4), as ``LowBitBaseCallback`` does;
            the bytes are modelled per phase (``low_bit_base.low_bit_phases``: the saving, byte for byte, less the
            largest dequantization of a layer that runs in that phase, ``low_bit_base.dequant_bytes``, measured); the
            step time is the float base's (not modelled).
        precisions: Precisions to consider; default float32 and the card's mixed precision (bf16, else fp16). Pass
            ``("32-true",)`` when you need float32 numerics.
        allow_chunked_ce: For a Hugging Face causal LM whose head and loss it reproduces exactly
            (``chunked_cross_entropy_hf.FAMILIES``), every setting but the plain one computes them in chunks
            (ChunkedCrossEntropyCallback), traced: the same loss and gradients and FLOPs, a fraction of the logits'
            bytes; the step-time model also counts each chunk's kernel launches, so on a small model it predicts the
            chunked step slower (and picks it only when the plain loss does not fit).
        allow_bf16_base: Under ``bf16-mixed``, frozen float32 Linear layers may be stored in bfloat16
            (``LowBitBaseCallback(bits=16)``): the same step to the bit (autocast computes with bfloat16 copies of
            them anyway), half their bytes; adapters and their optimizer state stay float32. Traced with the base
            converted on the copy (the bfloat16 copies autocast no longer makes are gone from the peak and the time).
        **strategy_options: The switches registered strategies declare (``Strategy.plan_options``).

    Raises:
        ValueError: For an unknown GPU, a profile without memory (``cpu``) or without the throughput (or, for
            several cards or offload, the link bandwidths) the time model needs, ``devices`` < 1, a margin outside
            [0, 1), or an unknown precision.

    Example:
        >>> import torch
        >>> from lightning_lowvram.demo import DigitsMLP
        >>> p = plan(DigitsMLP(), (torch.zeros(64, 64), torch.zeros(64, dtype=torch.long)), "rtx3060_12gb")
        >>> p.chosen.label, p.chosen.fits
        ('32-true, micro-batch 64', True)

    """
    profile = gpu_profile(gpu) if isinstance(gpu, str) else gpu
    precisions = _checked(profile, devices, margin, precisions)
    options = _plan_options(
        {"allow_int8_base": allow_int8_base, "allow_low_bit_base": allow_low_bit_base,
         "allow_bf16_base": allow_bf16_base, **strategy_options}
    )  # fmt: skip
    budget = int(profile.usable_bytes * (1.0 - margin))  # for tensors: the card minus its context, capped by free
    n = batch_size_of(batch)
    search = _Search(module, batch, profile, budget, n, devices, precisions, options)
    sizes = [n // 2**k for k in range(int(math.log2(n)) + 1)]  # n, n/2, ... 1 (halvings)
    first = "32-true" if "32-true" in precisions else precisions[0]
    cards = f"{devices} x {profile.name}" if devices > 1 else profile.name
    with progress(f"plan for {cards}", unit="trace") as search.progress:
        candidates = [search.extrapolated(first, n, False, (), ("none", "none"))]  # the plain setup
        search.chunked = allow_chunked_ce and is_chunkable(module)
        skipped: list[str] = []
        _search_layouts(search, sizes, candidates, skipped, allow_offload)
        chosen = _confirm(search, sizes, candidates)
    ordered = [candidates[0]] + sorted(candidates[1:], key=lambda c: (not c.fits, *_rank(c)))
    unique = {c.label: c for c in reversed(ordered)}  # one row a setting (the plain one first)
    rows = sorted(unique.values(), key=ordered.index)
    return Plan(profile, n, budget, rows, chosen, tuple(skipped), devices)


def _checked(
    profile: GPUProfile, devices: int, margin: float, precisions: tuple[str, ...] | list[str] | None
) -> tuple[str, ...]:
    """Refuse what cannot be planned (one line naming the value); the precisions to consider."""
    if profile.usable_bytes is None:
        raise ValueError(f"gpu {profile.name!r} has no memory size to plan for; pick a card, e.g. gpu=rtx3060_12gb")
    rates_of(profile)  # a card without throughput numbers: the error now
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be an integer >= 1, got {devices!r}")
    if devices > 1 and profile.interconnect_gbs is None:
        raise ValueError(f"gpu {profile.name!r} has no interconnect_gbs: planning across cards needs it (conf/gpu)")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    if precisions is None:
        precisions = ("32-true", "bf16-mixed" if profile.bf16 else "16-mixed")
    if isinstance(precisions, str) or not precisions:
        raise ValueError(f"precisions must be a non-empty list of precisions, got {precisions!r}")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"precisions: {unknown[0]!r} is not one of {', '.join(map(repr, PRECISIONS))}")
    return tuple(precisions)


def _plan_options(given: dict[str, Any]) -> dict[str, Any]:
    """Every registered strategy's switches, as given or defaulted; an unknown one is refused, naming the known."""
    known = plan_options()
    unknown = [k for k in given if k not in known]
    if unknown:
        raise ValueError(f"plan() got an unknown option {unknown[0]!r}; the strategies take {', '.join(known)}")
    return known | given


def plan_options() -> dict[str, Any]:
    """The planner's switches every registered strategy declares, with their defaults (``strategy=auto``'s keys)."""
    return {k: v for s in strategies() for k, v in s.plan_options.items()}


def _search_layouts(
    search: _Search, sizes: list[int], candidates: list[Candidate], skipped: list[str], allow_offload: bool
) -> None:
    """Each layout in order of traffic (what fits there bounds what more traffic could win); offload when none fits."""
    layouts: list[Layout] = [("none", "none")] + ([("grad_op", "none"), ("full", "none")] if search.devices > 1 else [])
    for layout in layouts:
        _search_layout(search, layout, sizes, candidates, skipped)
    name = search.profile.name
    if allow_offload and search.profile.pcie_gbs is None:
        skipped.append(f"FSDP2 + CPU offload (gpu {name!r} has no pcie_gbs to price it)")
    elif allow_offload and not any(c.fits for c in candidates):
        _search_layout(search, ("full", "params"), sizes, candidates, skipped)
    elif allow_offload:
        skipped.append("FSDP2 + CPU offload (tried only when nothing fits on the cards)")


def _confirm(search: _Search, sizes: list[int], candidates: list[Candidate]) -> Candidate | None:
    """The fastest fitting candidate, traced at its own size; if the extrapolation was optimistic, the next one.

    ``candidates`` gets the confirmed traces in place of the extrapolations (and any smaller retry).
    """
    pending = sorted((c for c in candidates if c.fits), key=_rank)
    while pending:
        best = pending.pop(0)
        confirmed = best if best.traced else search.traced(*search.key(best))
        candidates[next(i for i, c in enumerate(candidates) if c is best)] = confirmed
        if confirmed.fits:
            return confirmed
        smaller = [m for m in sizes if m < best.micro_batch_size]
        if smaller:
            retry = search.extrapolated(*search.key(dataclasses.replace(best, micro_batch_size=smaller[0])))
            if retry.fits:
                candidates.append(retry)
                pending = sorted([*pending, retry], key=_rank)
    return None


def _checkpointing(search: _Search, unsharded: bool) -> list[Ckpt]:
    """The checkpointing levels to try: none, then the blocks; offload and tiled MLPs when the card is priced."""
    levels: list[Ckpt] = [False, True] if _has_blocks(search.module) else [False]
    if levels[-1] and unsharded and search.profile.pcie_gbs is not None:
        levels.append("offload")  # the checkpointed blocks' inputs in host memory, when nothing else fits
        levels += ["tiled"] if _has_mlps(search.module) else []  # and the MLPs tiled, when that does not
    return levels


def _search_layout(
    search: _Search, layout: Layout, sizes: list[int], candidates: list[Candidate], skipped: list[str]
) -> None:
    """Add the largest micro-batch that fits under ``layout`` (else the smallest tried), per setting.

    Settings: precision x checkpointing x the registry's enumerated strategies (8-bit optimizer, low-bit base...: the
    values their ``choices`` offer); what cannot beat a fitting candidate is skipped.
    """
    n = search.n
    unsharded = layout[0] == "none"
    name = dataclasses.replace(candidates[0], devices=search.devices, sharding=layout[0], offload=layout[1]).layout
    for ckpt in _checkpointing(search, unsharded):  # without checkpointing first: it bounds what it could win
        if ckpt in ("offload", "tiled") and any(c.fits for c in candidates):
            what = "activation offload" if ckpt == "offload" else "tiled MLPs"
            skipped.append(f"{what} (tried only when nothing fits on the card)")
            continue
        for precision in search.precisions:
            if (ckpt or not unsharded) and _cannot_win(search, candidates, precision, n, layout):
                skipped.append(", ".join(p for p in (name, precision, "checkpointing" if ckpt else "") if p))
                continue
            for options in search.options_for(precision, unsharded):
                tried = [search.extrapolated(precision, m, ckpt, options, layout) for m in sizes]
                fitting = [c for c in tried if c.fits]
                candidates.append(fitting[0] if fitting else tried[-1])  # the largest that fits, else the smallest


def _rank(c: Candidate) -> tuple[float, int, int]:
    """Sort key: fastest first; on times equal to 3 significant digits, fewer changes, then the smaller peak.

    Modelled variants (8-bit state, a low-bit base) take the float step's time, so they tie with it: the setting that
    changes less of the user's setup wins the tie (a bfloat16 base, exact under bf16 autocast, before int8 / NF4).
    """
    changes = (c.precision != "32-true") + sum(s.changes(value) for s, value in settings_of(c.settings()))
    return round(c.step_time, 2 - int(math.floor(math.log10(max(c.step_time, 1e-9))))), changes, tensor_peak(c)


def _cannot_win(search: _Search, candidates: list[Candidate], precision: str, n: int, layout: Layout) -> bool:
    """Whether ``layout`` at ``precision`` cannot beat a fitting candidate, so it need not be traced further.

    Checkpointing and smaller micro-batches only add work: at best a layout matches its step at the whole batch.
    """
    best = min((c.step_time for c in candidates if c.fits), default=math.inf)
    return best <= search.extrapolated(precision, n, False, (), layout).step_time


class _Search:
    """Traces (cached) and the extrapolation from micro-batches of 1 and 2 to any size."""

    def __init__(
        self,
        module: nn.Module,
        batch: Any,
        profile: GPUProfile,
        budget: int,
        n: int,
        devices: int = 1,
        precisions: tuple[str, ...] = ("32-true",),
        options: dict[str, Any] | None = None,
    ) -> None:
        self.module, self.batch, self.profile, self.budget, self.n = module, batch, profile, budget, n
        self.devices, self.precisions, self.options = devices, precisions, options or {}
        self.chunked = False  # trace with the chunked cross-entropy (every setting but the plain one, where it applies)
        self.shared: dict[Any, Any] = {}  # the strategies' cache (StepContext.cache)
        self.cache: dict[tuple[Any, ...], MemoryEstimate] = {}
        self.progress: Progress | None = None  # a bar and a closing line while plan() runs

    def context(self, precision: str, unsharded: bool) -> StepContext:
        """What the strategies' hooks see of a setting."""
        return StepContext(
            self.module, precision, self.precisions, unsharded, self.chunked, self.options, self.shared
        )  # fmt: skip

    def options_for(self, precision: str, unsharded: bool) -> list[Options]:
        """Every combination of the enumerated strategies' values for a setting (all off first), in registry order."""
        ctx = self.context(precision, unsharded)
        enumerated = [s for s in strategies() if s.choices is not None and not s.axis]
        values = [[s.off, *s.choices(ctx)] for s in enumerated]  # type: ignore[misc]
        return [
            tuple((s.name, v) for s, v in zip(enumerated, combo, strict=True) if v != s.off)
            for combo in itertools.product(*values)
        ]

    def trace(self, precision: str, micro: int, ckpt: Ckpt, layout: Layout, options: Options = ()) -> MemoryEstimate:
        """The step traced (cached), with the traced part of ``options`` (a bfloat16 base...) applied to the copy."""
        traced = _traced_part(options)
        key = (precision, micro, ckpt, layout, self.chunked, traced)
        if key not in self.cache:
            self.cache[key] = estimate_step_memory(
                self.module, self.batch, micro_batch_size=micro, precision=precision,
                activation_checkpointing=bool(ckpt), offload_activations=ckpt in ("offload", "tiled"),
                tiled_mlp=ckpt == "tiled", gpu=self.profile,
                devices=self.devices, sharding=layout[0],  # type: ignore[arg-type]
                offload=layout[1], chunked_cross_entropy=self.chunked, strategies=dict(traced),  # type: ignore[arg-type]
                modelled=False,
            )  # fmt: skip
            if self.progress is not None:
                level = "checkpointing" if ckpt is True else ckpt
                self.progress.advance(f"{precision}, micro-batch {micro}" + (f", {level}" if level else ""))
        return self.cache[key]

    def traffic(self, precision: str, layout: Layout) -> Traffic:
        """One rank's bytes per micro-batch across cards and over PCIe (parameters as stored, trainable gradients)."""
        params, grads = parameter_bytes(self.module, precision), parameter_bytes(self.module, precision, trainable=True)
        return traffic_of(self.devices, layout[0], layout[1], params, grads)

    @staticmethod
    def key(c: Candidate) -> tuple[str, int, Ckpt, Options, Layout]:
        return c.precision, c.micro_batch_size, c.checkpointing, c.options, (c.sharding, c.offload)

    def _candidate(
        self, precision: str, micro: int, ckpt: Ckpt, options: Options, layout: Layout,
        estimate: MemoryEstimate, seconds: float, traced: bool,
    ) -> Candidate:  # fmt: skip
        ctx = self.context(precision, layout[0] == "none")
        for name, value in options:  # the modelled strategies, in registry order
            model = get(name).model
            estimate = model(estimate, value, ctx) if model is not None else estimate
        fits = estimate.peak - estimate.allowance <= self.budget
        return Candidate(
            precision, micro, bool(ckpt), estimate, fits, seconds, traced, self.devices, *layout,
            chunked_ce=self.chunked, offload_activations=ckpt in ("offload", "tiled"), tiled_mlp=ckpt == "tiled",
            options=options,
        )  # fmt: skip

    def copies(self, offloaded: float) -> float:
        """Seconds of one micro-batch's activation offload: out in forward, back in backward, at PCIe peak.

        No overlap with compute is assumed, so offload errs slow (unmeasured on a GPU).
        """
        return 2 * offloaded / (self.profile.pcie_gbs * 1e9) if offloaded else 0.0

    def traced(self, precision: str, micro: int, ckpt: Ckpt, options: Options, layout: Layout) -> Candidate:
        estimate = self.trace(precision, micro, ckpt, layout, options)
        steps = math.ceil(self.n / micro)
        seconds = estimate.work.seconds(self.profile, steps, self.traffic(precision, layout))
        seconds += steps * self.copies(estimate.offloaded_activations)
        return self._candidate(precision, micro, ckpt, options, layout, estimate, seconds, True)

    def extrapolated(self, precision: str, micro: int, ckpt: Ckpt, options: Options, layout: Layout) -> Candidate:
        traced = _traced_part(options)
        if (precision, micro, ckpt, layout, self.chunked, traced) in self.cache or micro <= 2:
            return self.traced(precision, micro, ckpt, options, layout)
        one = self.trace(precision, 1, ckpt, layout, options)
        two = self.trace(precision, min(2, self.n), ckpt, layout, options)
        grow = micro - 1

        def line(a: int, b: int) -> int:
            return int(a + (b - a) * grow)

        by_phase = {p: line(one.by_phase[p], two.by_phase[p]) for p in one.by_phase}
        peak = max(by_phase.values())
        # the categories of the size-2 trace, the growth put on what grows with the micro-batch
        by_category = dict(two.by_category)
        growing = [k for k in ("activations", "temporaries") if by_category.get(k)] or ["activations"]
        share = sum(by_category.get(k, 0) for k in growing)
        extra = peak - sum(by_category.values())
        for k in growing:
            by_category[k] = by_category.get(k, 0) + int(extra * (by_category.get(k, 0) / share if share else 1.0))
        moved = line(one.offloaded_activations, two.offloaded_activations)  # offloaded inputs grow with the batch too
        estimate = dataclasses.replace(
            two, peak=peak + two.allowance, by_phase=by_phase, by_category=by_category, work=None,
            method="extrapolated", host=two.host - two.offloaded_activations + moved, offloaded_activations=moved,
        )  # fmt: skip
        traffic = self.traffic(precision, layout)
        per_micro = [e.work.seconds(self.profile, 1, traffic) - e.work.seconds(self.profile, 0, traffic)
                     for e in (one, two)]  # fmt: skip
        micro_seconds = per_micro[0] + (per_micro[1] - per_micro[0]) * grow
        micro_seconds += self.copies(moved)
        seconds = math.ceil(self.n / micro) * micro_seconds + two.work.seconds(self.profile, 0, traffic)
        return self._candidate(precision, micro, ckpt, options, layout, estimate, seconds, False)


def _traced_part(options: Options) -> Options:
    """The options a trace applies to the copy (``trace``/``prepare``); the others are modelled per candidate."""
    return tuple((name, v) for name, v in options if get(name).trace or get(name).prepare)


def _has_mlps(module: nn.Module) -> bool:
    from lightning_lowvram.cores.tiled_mlp import mlp_modules

    try:
        return bool(mlp_modules(module))
    except ValueError:
        return False


def _has_blocks(module: nn.Module) -> bool:
    from lightning_lowvram.cores.activation_checkpointing import repeated_blocks

    return bool(repeated_blocks(module))
