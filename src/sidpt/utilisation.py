"""RL utilisation (docs/rlu.md): where every device-second of a step went (the waterfall) and how
much of the devices' capability turned into learning, ``RLU = U_hw x eta_use x eta_ess``.

    waterfall[p] = sum_ranks seconds[p] / sum_ranks wall            p in PHASES, plus "other":
                                                                    the untimed rest (1 - sum)
    U_hw    = sum_ranks,p roofline[p] / sum_ranks wall              roofline: max(FLOPs / peak,
                                                                    bytes / bandwidth) of the work
    eta_use = sum_p useful[p] / sum_p roofline[p]                   useful: on weighted tokens
    eta_ess = (sum w)^2 / (n sum w^2) of the loss tokens' importance weights (``mismatch/ess_weight``)

A trajectory's usefulness u_i is the share of its response tokens (those the policy generated)
that carry a non-zero loss weight (``weighted_mask``); its prompt and tool observations are the
context those tokens need, charged with them. A phase that runs the model over trajectories
(generate, reference, recompute, train) spends sum_i L_i u_i / sum_i L_i of its work (L_i: the
trajectory's real tokens) on weighted tokens; padding the trainer computed counts as work in
U_hw and as waste in eta_use; a publish serves the whole step and takes the step's share.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The phases of the waterfall, in its order. generate: the engine (prefill, decode, sampling,
# scheduling); environment: environment and reward calls (``sidpt.env.guard``); transfer:
# trajectories between meshes; schedule: the async rollout's group claims (store round trips)
# and bookkeeping; idle: waiting for other ranks at the step's sync points, or for work.
PHASES = ("generate", "environment", "transfer", "reference", "recompute", "train", "publish", "schedule", "idle")
TRAJECTORY_PHASES = ("generate", "reference", "recompute", "train")  # their work is per trajectory
ROLES = ("colocated", "rollout", "trainer", "reference")  # a rank's role in the waterfall by role


def weighted_mask(train_mask: torch.Tensor, advantages: torch.Tensor, weight: torch.Tensor,
                  regularised: bool) -> torch.Tensor:
    """Tokens that carry a non-zero loss weight: in the loss (``train_mask``, after the
    correction's masks and DAPO's filter), with an importance weight != 0 and an advantage != 0,
    or any advantage when a KL or entropy term (``regularised``) gives every loss token a
    gradient.  # [N, T] bool, each [N, T]"""
    signal = torch.ones_like(train_mask) if regularised else advantages != 0
    return train_mask & signal & (weight != 0)


def usefulness(response_mask: torch.Tensor, weighted: torch.Tensor) -> torch.Tensor:
    """u_i: weighted tokens over response tokens per trajectory (0 for an empty response: its
    work taught nothing).  # [N, T] bool x2 -> [N] float64"""
    resp = response_mask.sum(-1).double()
    return torch.where(resp > 0, (weighted & response_mask).sum(-1).double() / resp.clamp(min=1), 0.0)


@dataclass
class StepWork:
    """One rank's (or, summed, all ranks') accounts of a step, in seconds."""

    seconds: dict[str, float] = field(default_factory=dict)  # phase -> wall seconds on this rank
    roofline: dict[str, float] = field(default_factory=dict)  # phase -> its work at the device's peaks
    useful: dict[str, float] = field(default_factory=dict)  # trainer phases: roofline on weighted tokens
    weighted_len: float = 0.0  # sum_i L_i u_i over the trajectories trained (this rank's)
    total_len: float = 0.0  # sum_i L_i over the same
    wall: float = 0.0  # this rank's step time (summed: devices x wall)
    role: str = ""  # this rank's role (``ROLES``); a sum has none, it has ``by_role``
    by_role: dict[str, list[float]] = field(default_factory=dict)  # role -> seconds per phase + [wall]

    def add(self, phase: str, seconds: float = 0.0, roofline: float = 0.0, useful: float | None = None) -> None:
        if phase not in PHASES:
            raise KeyError(f"unknown phase {phase!r} (one of {PHASES})")
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self.roofline[phase] = self.roofline.get(phase, 0.0) + roofline
        if useful is not None:
            self.useful[phase] = self.useful.get(phase, 0.0) + useful

    def vector(self) -> list[float]:
        """A flat vector for one all-reduce; ``from_vector`` reads the sum back (a phase's
        ``useful`` counts when any rank has an account of it)."""
        has = [1.0 if p in self.useful else 0.0 for p in PHASES]
        own = [self.seconds.get(p, 0.0) for p in PHASES] + [self.wall]
        roles = [x for r in ROLES for x in self.by_role.get(r, own if r == self.role else [0.0] * len(own))]
        return ([self.seconds.get(p, 0.0) for p in PHASES] + [self.roofline.get(p, 0.0) for p in PHASES]
                + [self.useful.get(p, 0.0) for p in PHASES] + has + [self.weighted_len, self.total_len, self.wall]
                + roles)

    @staticmethod
    def from_vector(v: list[float]) -> StepWork:
        n = len(PHASES)
        s, rf, u, has = v[:n], v[n:2 * n], v[2 * n:3 * n], v[3 * n:4 * n]
        blocks = v[4 * n + 3:]
        by_role = {r: blocks[i * (n + 1):(i + 1) * (n + 1)] for i, r in enumerate(ROLES)}
        return StepWork(dict(zip(PHASES, s)), dict(zip(PHASES, rf)),
                        {p: x for p, x, h in zip(PHASES, u, has) if h > 0}, *v[4 * n:4 * n + 3],
                        by_role={r: b for r, b in by_role.items() if any(b)})

    def __add__(self, other: StepWork) -> StepWork:
        return StepWork.from_vector([a + b for a, b in zip(self.vector(), other.vector())])


def add_model_phase(w: StepWork, phase: str, flops: float, peak_flops: float, lens: list[int], u: list[float],
                    rows: list[int], executed: float, passes: int) -> None:
    """A trainer phase that ran the model ``passes`` times over ``rows`` (indices into ``lens``,
    each trajectory's real tokens, and ``u``, its usefulness): ``flops``, the model FLOPs of the
    real tokens (``sidpt.flops``), at the peak; ``executed``, the tokens the forwards ran on
    (padded or packed). Padding is work (U_hw) spent on no token (eta_use); packing's savings
    are not work."""
    real = passes * sum(lens[i] for i in rows)
    pad = max(1.0, executed / real) if real else 1.0
    L = sum(lens[i] for i in rows)
    s = sum(lens[i] * u[i] for i in rows) / L if L else 0.0
    w.add(phase, roofline=flops / peak_flops * pad, useful=flops / peak_flops * s)


def add_trained(w: StepWork, lens: list[int], u: list[float]) -> None:
    """The trajectories a trainer rank received this step: sum L_i u_i and sum L_i (``share``)."""
    w.weighted_len += sum(L * x for L, x in zip(lens, u))
    w.total_len += float(sum(lens))


def share(w: StepWork) -> float:
    """The step's token-weighted usefulness, sum L_i u_i / sum L_i (0 when nothing was trained)."""
    return w.weighted_len / w.total_len if w.total_len > 0 else 0.0


def useful_seconds(w: StepWork, gen_share: float | None = None) -> dict[str, float]:
    """Per phase, the roofline seconds spent on weighted tokens: a trainer phase's own account
    where it has one, else the phase's roofline times the step's share (``gen_share`` for
    generation when it differs: the async pipeline also discards samples)."""
    s = share(w)
    return {p: w.useful[p] if p in w.useful else w.roofline.get(p, 0.0) * (gen_share if p == "generate"
                                                                            and gen_share is not None else s)
            for p in PHASES}


def rlu_row(w: StepWork, ess: float, gen_share: float | None = None, between: float = 0.0) -> dict[str, float]:
    """The step's (or run's) figures from summed accounts: the waterfall's shares of devices x
    wall (``waterfall/other``: the untimed rest), U_hw, eta_use, eta_ess (``ess``) and RLU.
    ``between`` (a run's): device-seconds outside the steps (evaluations, checkpoints, the
    metrics between steps), added to the wall as ``waterfall/between_steps``."""
    wall = max(w.wall + between, 1e-12)
    row = {f"waterfall/{p}": w.seconds.get(p, 0.0) / wall for p in PHASES}
    if between:
        row["waterfall/between_steps"] = between / wall
    row["waterfall/other"] = 1.0 - sum(row.values())
    roof = sum(w.roofline.get(p, 0.0) for p in PHASES)
    useful = sum(useful_seconds(w, gen_share)[p] for p in PHASES)  # the same order: exactly 1 when all is useful
    u_hw, eta_use = roof / wall, (useful / roof if roof > 0 else 0.0)
    row.update({"rlu/u_hw": u_hw, "rlu/eta_use": eta_use, "rlu/eta_ess": ess, "rlu/rlu": u_hw * eta_use * ess,
                "rlu/device_s": wall, "perf/trained_tokens_per_device_s": w.total_len / wall})
    row.update({f"rlu/roofline_{p}": w.roofline.get(p, 0.0) / wall for p in PHASES if w.roofline.get(p)})
    roles = {r: b for r, b in w.by_role.items() if b[-1] > 0}
    if len(roles) > 1:  # the waterfall of each role's ranks, over their own device time
        for r, b in roles.items():
            shares = {f"waterfall_{r}/{p}": x / b[-1] for p, x in zip(PHASES, b)}
            row.update(shares)
            row[f"waterfall_{r}/other"] = 1.0 - sum(shares.values())
            row[f"rlu/device_s_{r}"] = b[-1]
    return row


def utilisation_table(row: dict[str, float], title: str = "RL utilisation over the run"):
    """A rich table of ``rlu_row``'s figures: RLU and its factors, then the waterfall."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, label in (("rlu/rlu", "RLU"), ("rlu/u_hw", "U_hw (roofline time / device time)"),
                     ("rlu/eta_use", "eta_use (share on weighted tokens)"), ("rlu/eta_ess", "eta_ess")):
        t.add_row(label, f"{row[k]:.4f}")
    for k, v in row.items():
        if k.startswith("waterfall/"):
            t.add_row(f"  {k.removeprefix('waterfall/')} (% of device time)", f"{100 * v:.1f}")
    t.add_row("device time (s)", f"{row['rlu/device_s']:.1f}")
    return t
