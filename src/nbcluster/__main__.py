"""``python -m nbcluster`` runs the command-line interface."""

from nbcluster.cli import main

if __name__ == "__main__":
    main()
