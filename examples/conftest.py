import pathlib
import sys

# Lets the tests (and `gradcheck examples/seed_networks.py:SigmoidNet`) import the networks.
sys.path.insert(0, str(pathlib.Path(__file__).parent))
