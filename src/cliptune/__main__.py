"""`python -m cliptune` (also what `accelerate launch -m cliptune` runs)."""

from cliptune.cli.app import main

if __name__ == "__main__":
    main()
