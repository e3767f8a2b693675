"""``python -m diffattn.app`` (the same as ``diffattn app``)."""
from .launcher import main

if __name__ == "__main__":
    main()
