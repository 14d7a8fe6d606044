"""The async pipeline's batch scheduling: which finished trajectories the trainer trains at each
step, under the staleness bound, and the bias that choice introduces, measured every step.

Terms. The trainer's step ``s`` trains with weights of version ``s`` and publishes ``s + 1``.
Prompt groups are numbered across steps (group ``i`` is the ``i % B``-th group of step
``p = i // B``: the prompts the synchronous run would draw at step ``p``). A rollout rank holding
version ``w`` starts group ``i`` once ``w >= p - lookahead`` (``lookahead``). A trained token
sampled by version ``v`` has staleness ``s - v``; ``rollout.max_staleness = k`` bounds it, for
every trained token, by construction of each policy (and ``select`` checks it):

- ``fifo``: the first ``B * G`` trajectories to finish, whatever their group (the naive streaming
  pipeline); a trajectory that would exceed ``k`` is dropped, as PipelineRL's ``max_lag`` and
  prime-rl's ``max_off_policy_steps`` do. A group's members can land in different steps, each
  part getting its own GRPO baseline.
- ``group_complete``: whole groups (all G samples), first completed first; a group with a member
  that would exceed ``k`` is dropped whole.
- ``paced`` (after tinker-cookbook PR #822: pace admission, train oldest first, never discard):
  step ``s`` trains exactly groups ``sB .. sB + B - 1``, waiting for the last of them. Started at
  ``>= s - k``, none exceeds ``k``.
- ``debiased`` (ours): earliest-deadline-first with slack. Groups start ``k - slack`` steps ahead
  (``slack = k // 2``) and must be trained by step ``p + slack``: the step takes every group that
  is due (waiting for it if it has not finished), then fills up with completed groups in
  completion order. It never discards, and the due groups number at most ``B`` at every step
  (every group of an earlier step was due earlier), so the schedule is always feasible. Against
  ``paced`` it trains fresher data (whatever finished first, within the deadline) with the same
  bound; against ``fifo`` it never drops the slow groups, which are the long and the hard ones.

The bias figures, over the last ``window`` steps: trained mean response length / sampled mean
response length, and the same for the reward (pass rate), where "sampled" is every trajectory that
finished generating in the window, trained or not (in steady state, what finishes is what
started: no policy here aborts a trajectory for good). Starvation: of the groups that started
between ``2 window`` and ``window`` steps ago and have a low pass rate (mean reward of their
finished samples < 0.5, or none finished), the share not fully trained yet. The staleness
histogram is over the trained tokens. All state is explicit (the finished, untrained trajectories
with their versions; what was trained and dropped): what a checkpoint of the pipeline holds.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field

from sidpt.batch import Trajectory

POLICIES = ("fifo", "group_complete", "paced", "debiased")
LOW_PASS = 0.5  # a group whose mean reward is below this counts as hard (starvation figure)


def slack(policy: str, k: int) -> int:
    """Steps a ``debiased`` group may be trained after its own step (0 for the others)."""
    return k // 2 if policy == "debiased" else 0


def lookahead(policy: str, k: int) -> int:
    """How many versions before its step a group may start (``k - slack``)."""
    return k - slack(policy, k)


@dataclass
class PipelineState:
    """The trainer side of the async pipeline (on the main trainer rank)."""

    policy: str
    B: int  # groups per step
    G: int  # samples per group
    k: int  # rollout.max_staleness
    window: int
    step: int = 0
    pending: dict[int, dict[int, Trajectory]] = field(default_factory=dict)  # group -> index -> finished, untrained
    order: dict[tuple[int, int], int] = field(default_factory=dict)  # (group, index) -> arrival number
    arrivals: int = 0
    trained: dict[int, int] = field(default_factory=dict)  # group -> samples trained
    rewards: dict[int, list[float]] = field(default_factory=dict)  # group -> rewards of its finished samples
    dead: set[int] = field(default_factory=set)  # group_complete: groups dropped whole
    next_group: int = 0  # paced / debiased: every group below it is trained
    dropped: int = 0
    events: deque = field(default_factory=deque)  # (step, "sampled" | "trained", length, reward)
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("sampled_n", "sampled_length", "sampled_reward", "trained_n", "trained_length", "trained_reward"), 0.0))

    def add(self, t: Trajectory) -> None:
        """A trajectory finished generating (it arrived from a rollout rank)."""
        self.order[(t.group, t.index)] = self.arrivals
        self.arrivals += 1
        self.rewards.setdefault(t.group, []).append(t.reward)
        self._event("sampled", t)
        if t.group in self.dead:
            self.dropped += 1
            return
        self.pending.setdefault(t.group, {})[t.index] = t

    def select(self) -> list[Trajectory] | None:
        """This step's batch (removed from ``pending``; stale ones dropped as the policy says), or
        None: the policy must wait for more trajectories."""
        s, B, G, k = self.step, self.B, self.G, self.k
        if self.policy == "fifo":
            for g in list(self.pending):
                for j in [j for j, t in self.pending[g].items() if t.version < s - k]:
                    del self.pending[g][j]
                    self.dropped += 1
            flat = sorted((t for m in self.pending.values() for t in m.values()),
                          key=lambda t: self.order[(t.group, t.index)])
            chosen = flat[: B * G] if len(flat) >= B * G else None
        elif self.policy == "group_complete":
            for g in [g for g, m in self.pending.items() if any(t.version < s - k for t in m.values())]:
                self.dropped += len(self.pending.pop(g))
                self.dead.add(g)
            done = [g for g, m in self.pending.items() if len(m) == G]
            done.sort(key=lambda g: max(self.order[(g, j)] for j in self.pending[g]))
            chosen = [t for g in done[:B] for t in self.pending[g].values()] if len(done) >= B else None
        else:
            due_until = (s - slack(self.policy, k) + 1) * B  # groups below this index must be trained now
            due = [g for g in range(self.next_group, due_until) if self.trained.get(g, 0) < G]
            if any(len(self.pending.get(g, {})) < G for g in due):
                return None
            done = [g for g, m in self.pending.items() if len(m) == G and g >= due_until]
            done.sort(key=lambda g: max(self.order[(g, j)] for j in self.pending[g]))
            groups = due + done[: B - len(due)]
            if len(groups) < B:
                return None
            chosen = [t for g in groups for t in self.pending[g].values()]
        if chosen is None:
            return None
        for t in chosen:
            del self.pending[t.group][t.index]
            if not self.pending[t.group]:
                del self.pending[t.group]
            self.trained[t.group] = self.trained.get(t.group, 0) + 1
            self._event("trained", t)
        while self.trained.get(self.next_group, 0) >= G:
            self.next_group += 1
        worst = max(s - t.version for t in chosen)
        if worst > k:
            raise RuntimeError(f"staleness bound violated: a token of staleness {worst} > rollout.max_staleness={k} "
                               f"at step {s} (policy {self.policy})")
        return sorted(chosen, key=lambda t: (t.group, t.index))

    def _event(self, kind: str, t: Trajectory) -> None:
        self.events.append((self.step, kind, t.length, t.reward))
        self.totals[f"{kind}_n"] += 1
        self.totals[f"{kind}_length"] += t.length
        self.totals[f"{kind}_reward"] += t.reward

    def metrics(self, chosen: list[Trajectory]) -> dict[str, float]:
        """The step's staleness, bias and starvation figures (module docstring); call after
        ``select``, before ``advance``."""
        s, k, W = self.step, self.k, self.window
        while self.events and self.events[0][0] <= s - W:
            self.events.popleft()
        out: dict[str, float] = {}
        ages = [s - v for t in chosen for v, m in zip(t.versions, t.loss_mask) if m]
        for d in range(k + 1):
            out[f"staleness/tokens_{d}"] = float(sum(a == d for a in ages))
        out["staleness/max"] = float(max(ages, default=0))
        out["staleness/mixed_seqs"] = float(sum(len({v for v, m in zip(t.versions, t.loss_mask) if m}) > 1
                                                for t in chosen))  # sampled by more than one version
        out["staleness/mean"] = sum(ages) / max(len(ages), 1)
        tot = self.totals
        for col, name in enumerate(("length", "reward")):
            win = {kind: [e[2 + col] for e in self.events if e[1] == kind] for kind in ("sampled", "trained")}
            mean = {kind: sum(v) / max(len(v), 1) for kind, v in win.items()}
            out[f"bias/{name}_ratio"] = mean["trained"] / mean["sampled"] if mean["sampled"] else 1.0
            run = {kind: tot[f"{kind}_{name}"] / max(tot[f"{kind}_n"], 1) for kind in ("sampled", "trained")}
            out[f"bias/{name}_ratio_run"] = run["trained"] / max(run["sampled"], 1e-12)
        a = lookahead(self.policy, k)
        cohort = range(max(0, (s - 2 * W + 1 + a) * self.B), max(0, (s - W + 1 + a) * self.B))
        low = [g for g in cohort if not self.rewards.get(g) or sum(self.rewards[g]) / len(self.rewards[g]) < LOW_PASS]
        out["bias/starved_low_pass"] = (sum(self.trained.get(g, 0) < self.G for g in low) / len(low)) if low else 0.0
        out["sched/dropped"] = float(self.dropped)
        out["sched/pending"] = float(sum(len(m) for m in self.pending.values()))
        return out

    def advance(self) -> None:
        self.step += 1

    def state_dict(self) -> dict:
        """Everything above as plain containers (``torch.load(..., weights_only=True)`` reads it
        back): what a checkpoint of the async pipeline holds on the trainer side."""
        return {"step": self.step, "pending": [dataclasses.astuple(t) for m in self.pending.values() for t in m.values()],
                "order": dict(self.order), "arrivals": self.arrivals, "trained": dict(self.trained),
                "rewards": {g: list(v) for g, v in self.rewards.items()}, "dead": set(self.dead),
                "next_group": self.next_group, "dropped": self.dropped, "events": list(self.events),
                "totals": dict(self.totals)}

    def load_state_dict(self, sd: dict) -> None:
        for t in (Trajectory(*row) for row in sd["pending"]):
            self.pending.setdefault(t.group, {})[t.index] = t
        self.step, self.order, self.arrivals, self.trained = sd["step"], sd["order"], sd["arrivals"], sd["trained"]
        self.rewards, self.dead, self.next_group, self.dropped = sd["rewards"], sd["dead"], sd["next_group"], sd["dropped"]
        self.events, self.totals = deque(sd["events"]), sd["totals"]

    def missing(self) -> tuple[list[tuple[int, tuple[int, ...]]], int]:
        """The work a resumed pipeline must redo: every sample of a group below the newest one that
        ever arrived which never arrived (it was running, or on its way, when the checkpoint was
        taken), group by group; and the first group no sample of which arrived."""
        first = max((g for g, _ in self.order), default=-1) + 1
        redo = [(g, tuple(j for j in range(self.G) if (g, j) not in self.order)) for g in range(first)]
        return [(g, idx) for g, idx in redo if idx and g not in self.dead], first
