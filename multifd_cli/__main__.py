"""``python -m multifd_cli`` behaves exactly like the ``multifd`` script."""

from multifd_cli.cli import main

if __name__ == "__main__":
    main()
