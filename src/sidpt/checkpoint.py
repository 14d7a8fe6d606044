"""What a run saves: its policy as an HF checkpoint (config.json, safetensors, tokenizer files),
and training checkpoints to resume from (``save_training_state``, ``newest_checkpoint``)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from sidpt.files import atomic_write
from sidpt.model import CheckpointError, ModelArgs, build_model, read_args, save_checkpoint
from sidpt.model.hf_io import hf_config_from_args


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def save_policy(full_weights, tok, args, out: Path, write: bool) -> None:
    """The trained policy as an HF checkpoint, written atomically (``write``: the main trainer
    rank) from the trainer's full-weight buckets (``Trainer.full_weights``: collective on the
    trainer mesh, every trainer rank iterates to the end)."""
    state = {}
    for bucket in full_weights:
        if write:
            state.update({k: v.detach().clone() for k, v in bucket.items()})
    if write:
        extra = {n: tok.path / n for n in TOKENIZER_FILES if (tok.path / n).exists()}
        save_checkpoint(out, args, state, extra_files=extra)


def hf_files(args: ModelArgs, dtype: torch.dtype, tok_dir: Path) -> dict[str, str | Path]:
    """What a training checkpoint carries to be exported as an HF checkpoint (``export_hf``): the
    model's config.json (text) and the tokenizer's files (paths to copy)."""
    files: dict[str, str | Path] = {"config.json": json.dumps(hf_config_from_args(args, dtype), indent=1)}
    files.update({n: Path(tok_dir) / n for n in TOKENIZER_FILES if (Path(tok_dir) / n).exists()})
    return files


def export_hf(checkpoint: Path, out: Path) -> Path:
    """A training checkpoint's policy as an HF checkpoint at ``out`` (config.json, safetensors, the
    tokenizer files), in one process: what ``--model.path`` and transformers load."""
    problem = verify(checkpoint)
    if problem is not None:
        raise CheckpointError(f"{checkpoint}: not a complete checkpoint ({problem})")
    if not (checkpoint / "config.json").exists():
        raise CheckpointError(f"{checkpoint}: no config.json (written by sidpt before HF export existed)")
    args = read_args(checkpoint)
    dtype = getattr(torch, json.loads((checkpoint / "config.json").read_text()).get("torch_dtype", "float32"))
    model = build_model(args, dtype=dtype)
    state = {"model": model.state_dict()}
    reader = SafeReader(str(checkpoint))
    reader.read_metadata()
    dcp.load(state, storage_reader=reader, no_dist=True)
    save_checkpoint(out, args, state["model"],
                    extra_files={n: checkpoint / n for n in TOKENIZER_FILES if (checkpoint / n).exists()})
    return out


# -- training checkpoints (resume) ------------------------------------------------------------
#
#   <run_dir>/checkpoints/step_000006/      a complete checkpoint: RL steps 0..5 done
#       __0_0.distcp ..., .metadata          torch.distributed.checkpoint: model + AdamW, sharded
#                                            (and the KL reference when the trainer holds one)
#       controller.json                      step, policy version
#       rng_rank<r>.pt                       every trainer rank's torch RNG state
#       pipeline.pt                          the async pipeline: schedule state, arrived trajectories,
#                                            the trainer's rows, the work to redo (weights_only)
#       config.json, tokenizer files         for ``export_hf`` (tools/export_checkpoint.py)
#       manifest.json                        sha256 and size of every file above (written last)
#
# Written under ``.tmp-step_...`` by the trainer ranks, then renamed by the main trainer rank once
# the manifest is in: a checkpoint directory without a valid manifest is incomplete. The prompt
# stream needs no state of its own: a step's prompts and episode seeds are functions of (seed,
# step) (``data.step_indices``, ``data.episode_seed``), and the learning rate of the step
# (``trainer.lr_at``), so the step is the cursor.

MANIFEST = "manifest.json"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_training_state(trainer, run_dir: Path, step: int, keep: int, rank: int, main: bool, group,
                        pipeline: dict | None = None, hf: dict[str, str | Path] | None = None,
                        report=None) -> Path | None:
    """The trainer's state after ``step`` RL steps (collective on the trainer ranks ``group``);
    the main trainer rank writes ``pipeline`` (the async pipeline's state: tensors, numbers, lists,
    loadable with ``weights_only``), ``hf`` (``hf_files``: for ``export_hf``) and the manifest, publishes the directory by rename and keeps
    the newest ``keep``. A write the file system refuses (disk full, quota) on any rank leaves no
    trace: the temporary directory is removed, the previous checkpoints stand, ``report`` says so
    and None is returned (the run goes on; the next checkpoint tries again). ``report``: stderr."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    error = None
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(group)
        dcp.save(_state(trainer), checkpoint_id=str(tmp), process_group=group)
        torch.save(torch.get_rng_state(), tmp / f"rng_rank{rank}.pt")
        if main and pipeline is not None:
            torch.save(pipeline, tmp / PIPELINE)
        for name, src in (hf or {}).items() if main else ():
            if isinstance(src, Path):
                shutil.copyfile(src, tmp / name)
            else:
                atomic_write(tmp / name, src)
    except (OSError, RuntimeError, CheckpointException) as e:  # only writes above: a refused write
        # (torch.save's zip writer turns EFBIG / ENOSPC into "RuntimeError: ... unexpected pos")
        error = e
    if _any_failed(error is not None, trainer, group):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = sorted(final.parent.glob("step_*"))
            report = report or Console(stderr=True).print
            why = _os_error(error) if error is not None else "failed on another trainer rank"
            free = shutil.disk_usage(final.parent).free / 2**20
            report(f"[red]checkpoint {final.name} not written ({escape(why)}; {free:.0f} MiB free there); the previous "
                   f"one stands: {kept[-1] if kept else 'none'}[/]")
        return None
    if main:
        atomic_write(tmp / "controller.json", json.dumps({"step": step, "policy_version": step}))
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(final.parent.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(group)
    return final


PIPELINE = "pipeline.pt"


def _barrier(group) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _any_failed(failed: bool, trainer, group) -> bool:
    """Whether any trainer rank failed its part (a max all-reduce: every rank agrees)."""
    if not dist.is_initialized():
        return failed
    flag = torch.tensor([float(failed)], device=trainer.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def _os_error(e: BaseException) -> str:
    if isinstance(e, CheckpointException):
        e = next(iter(e.failures.values()))[0]
    return f"{type(e).__name__}: {e}"


def _state(trainer) -> dict:
    """What a checkpoint holds of the trainer: the policy and AdamW (sharded as FSDP holds them)
    and, with a KL term, the frozen reference (the warm-started policy, not the init: without it a
    resumed run would anchor its KL elsewhere)."""
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.opt)
    state = {"model": model_sd, "optim": optim_sd}
    if trainer.reference is not None:
        state["reference"] = trainer.reference.state_dict()
    return state


def verify(path: Path) -> str | None:
    """None when ``path`` is a complete checkpoint (every file of its manifest, size and sha256),
    else what is wrong with it."""
    m = path / MANIFEST
    if not m.exists():
        return "no manifest.json (the write did not finish)"
    try:
        manifest = json.loads(m.read_text())
    except ValueError as e:
        return f"manifest.json unreadable ({e})"
    for name, want in manifest.items():
        f = path / name
        if not f.exists():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {want['bytes']}"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def newest_checkpoint(run_dir: Path, report) -> Path | None:
    """The newest complete checkpoint under ``run_dir``; an incomplete or corrupted one is
    reported by name (``report(text)``) and skipped."""
    for path in sorted((Path(run_dir) / "checkpoints").glob("step_*"), reverse=True):
        problem = verify(path)
        if problem is None:
            return path
        report(f"checkpoint {path} skipped: {problem}")
    return None


# DCP pickles its ``.metadata``; ``FileSystemReader`` unpickles it with no restriction, so a crafted
# checkpoint would run code on load. ``SafeReader`` admits only the types DCP itself writes (read
# off a sidpt checkpoint's pickle): its metadata dataclasses, torch.Size, dtypes, layouts, paths.
_METADATA_TYPES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                   ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
                   ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in _METADATA_TYPES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a type a checkpoint's metadata holds")


class SafeReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose metadata unpickling admits only DCP's own types (the tensors
    themselves are read with ``weights_only=True`` by DCP already)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: refused ({e}); a checkpoint's metadata holds no code") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_training_state(trainer, path: Path, rank: int, group) -> int:
    """Load ``path`` into the trainer (model, AdamW, the reference, this rank's RNG); returns the step."""
    state = _state(trainer)
    reader = SafeReader(str(path))
    reader.read_metadata()  # a refused pickle raises here, by name (inside dcp.load it is re-wrapped)
    dcp.load(state, storage_reader=reader, process_group=group)
    set_state_dict(trainer.model, trainer.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if trainer.reference is not None:
        trainer.reference.load_state_dict(state["reference"])
    rng = path / f"rng_rank{rank}.pt"
    if rng.exists():
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return int(json.loads((path / "controller.json").read_text())["step"])
