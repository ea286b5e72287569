"""`python -m ufs` is the `ufs` command."""
from ufs.cli import main

if __name__ == "__main__":
    main()
