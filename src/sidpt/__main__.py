"""``python -m sidpt <config.toml> [--a.b=c ...]`` (one process) or ``./torchrun.sh <config.toml>``.

Parses and validates the config first (errors name the key), then imports the heavy parts and
runs the controller: task -> SFT warm-start (optional) -> RL -> evaluation table.
"""

import sys

from sidpt.config import ConfigError, help_text, load_config


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
    from sidpt.controller import run

    try:
        run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
