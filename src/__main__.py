"""`python -m iclora COMMAND ...`: the `iclora` command without installing it."""

from .commands import main

if __name__ == "__main__":
    main()
