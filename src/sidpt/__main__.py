"""``python -m sidpt <config.toml> [--a.b=c ...]`` (one process) or ``./torchrun.sh <config.toml>``.

Parses and validates the config first (errors name the key), then imports the heavy parts and
runs the controller: task -> SFT warm-start (optional) -> RL -> evaluation table.
"""

import sys
import traceback
from pathlib import Path

from sidpt.config import ConfigError, help_text, load_config


def resolve_env(table: dict) -> dict:
    """The ``[env]`` table validated by its environment's Config, every default filled in (so the
    saved config.toml holds the whole resolved environment)."""
    from sidpt.env import env_table, load_environment

    _, env_cfg = load_environment(table)
    return env_table(table.get("name", "search"), env_cfg)


def env_help() -> str:
    from sidpt.env import ENVIRONMENTS, load_environment

    return "\n".join(f"\n[env] name = {name!r}\n" + help_text(load_environment({"name": name})[0].Config, "env.")
                     for name in ENVIRONMENTS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print(help_text())
        print(env_help())
        return 0 if argv else 2
    if argv[0].startswith("--"):
        print(f"config error: the first argument must be a config file (e.g. configs/debug.toml), got "
              f"{argv[0]!r}; the built-in defaults are not a recipe", file=sys.stderr)
        return 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:  # the environment's keys and your reward function, before anything runs
        cfg.env = resolve_env(cfg.env)
        from sidpt.env import load_reward

        load_reward(cfg.task.reward)
    except ConfigError as e:
        print(f"config error: {argv[0]}: {e}", file=sys.stderr)
        return 2
    from sidpt.controller import run
    from sidpt.env.search.bm25 import CorpusError
    from sidpt.env.search.env import DataError
    from sidpt.model.hf_io import CheckpointError
    from sidpt.model.numerics import NumericsError
    from sidpt.model.tokenizer import TokenizerError

    try:
        run(cfg)
    except (ConfigError, DataError, CorpusError, CheckpointError, TokenizerError, NumericsError) as e:
        # a user's mistake: one line naming the culprit; the traceback goes to the run's error.log
        log = Path(cfg.run.out_dir) / cfg.run.name / "error.log"
        if log.parent.is_dir():
            log.write_text(traceback.format_exc())
        kind = "config error" if isinstance(e, ConfigError) else f"{type(e).__name__}"
        print(f"{kind}: {e}" + (f" (traceback: {log})" if log.exists() else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a Ctrl-C outside the step loop, or a second one: nothing more is saved
        print("interrupted (a single Ctrl-C during training stops at a step boundary and saves)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
