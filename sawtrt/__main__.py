"""`python -m sawtrt ...` == the `sawtrt` console script (runs this checkout's package)."""
from .cli import main

main(prog_name="sawtrt")
