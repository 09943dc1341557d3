"""`python -m medusa.hf_utils --folder DIR --repo NAME`: the original Medusa project's upload command
(= `medusa push`)."""
import sys

from medusa.interfaces.cli import main

if __name__ == "__main__":
    sys.exit(main(["push", *sys.argv[1:]]))
