"""`python -m medusa.inference.cli --model PATH`: the original Medusa project's chat command."""
import sys

from medusa.interfaces.cli import main

if __name__ == "__main__":
    sys.exit(main(["chat", *sys.argv[1:]]))
