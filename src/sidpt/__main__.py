"""``python -m sidpt <config.toml> [--a.b=c ...]`` (one process) or ``./torchrun.sh <config.toml>``.

Today the entry resolves and validates the config, writes it beside the run's outputs, builds or
loads the policy model and runs one forward pass as a smoke check. The training loop (rollout,
reward, trainer, weight publish) is not built yet: it arrives with the controller.
"""

import sys

from sidpt.config import ConfigError, help_text, load_config, save_config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print(help_text())
        return 0 if argv else 2
    path, overrides = (argv[0], argv[1:]) if not argv[0].startswith("--") else (None, argv)
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from pathlib import Path  # heavy imports only after the config is known to be valid

    import torch
    from rich.console import Console

    from sidpt.model import SIZES, build_model, load_checkpoint
    from sidpt.model.model import DTYPES, count_params

    console = Console()
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    save_config(cfg, run_dir / "config.toml")
    torch.manual_seed(cfg.run.seed)
    if cfg.model.path:
        model = load_checkpoint(cfg.model.path, dtype=cfg.model.dtype)
    else:
        if cfg.model.size not in SIZES:
            print(f"config error: model.size={cfg.model.size!r}: expected one of {list(SIZES)}", file=sys.stderr)
            return 2
        model = build_model(SIZES[cfg.model.size], dtype=DTYPES[cfg.model.dtype], seed=cfg.run.seed)
    tokens = torch.randint(0, model.args.vocab_size, (2, 16))
    with torch.no_grad():
        logits = model(tokens)
    if not torch.isfinite(logits).all():
        print("model check failed: non-finite logits", file=sys.stderr)
        return 1
    console.print(f"[bold]sidpt[/] config resolved -> {run_dir / 'config.toml'}")
    console.print(
        f"model: {model.args.family}, {count_params(model) / 1e6:.2f}M params, {cfg.model.dtype}; "
        f"forward [2, 16] -> logits {tuple(logits.shape)} ok"
    )
    console.print("training loop: not built yet (see the open issues); nothing else to run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
