"""``python -m normlab`` runs the command-line interface."""

from normlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
