"""`python run.py [group=option ...] [key=value ...]`: the same as the `delift` command (see README)."""

from delift.cli import main

if __name__ == "__main__":
    main()
