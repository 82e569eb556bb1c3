"""``python -m nbcluster.kernel -f CONNECTION_FILE`` starts one kernel replica."""

from nbcluster.kernel import main

if __name__ == "__main__":
    main()
